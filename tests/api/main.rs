//! Black-box tests of lq-realtime: the application on a real port, driven by a real WebSocket
//! client and a real HTTP client; the binary itself for signals and the command line.

mod helpers;
mod postgres_support;
mod redis_support;
mod sse_client;
#[macro_use]
mod transport;

mod broker_contract;
mod browser;
mod chaos;
mod cluster;
mod console;
mod contract;
mod dashboard;
mod deployment;
mod direct;
mod framing;
mod loadgen;
mod observability;
mod openapi;
mod operations;
mod persistence;
mod presence;
mod process;
mod proxy;
mod recovery;
mod scale_out;
mod security;
mod server_api;
mod stats;
mod topics;
mod webhook_providers;
mod webhooks;
mod websocket;
