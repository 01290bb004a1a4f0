//! Inbound adapters: the HTTP and WebSocket surface that drives the use-cases.

pub mod console;
pub mod error;
pub mod http;
pub mod ws;
