//! Inbound adapters: the HTTP surface and the client transports (WebSocket, Server-Sent Events)
//! that drive the use-cases.

pub mod admin;
pub mod console;
pub mod error;
pub(crate) mod handshake;
pub mod http;
mod server_api;
pub mod sse;
mod stats;
pub mod ws;
