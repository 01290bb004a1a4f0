//! The `lq-realtime` binary's library: configuration, wiring, telemetry and the command line.
//!
//! The only crate that knows every other; `main.rs` just calls [`cli::main`].
//!
//! # Layout
//! - [`config`]: environment variables, their defaults and validation.
//! - [`environment`]: variables that look meant for the service but that it does not read.
//! - [`webhook_config`]: the webhook configuration file (`WEBHOOK_CONFIG`).
//! - [`app`]: `Application::build` (wire and bind) and `run_until` (serve, then shut down).
//! - [`telemetry`]: `tracing` set-up (text or JSON).
//! - [`cli`]: `lq-realtime` and `lq-realtime token`.

pub mod app;
pub mod cli;
pub mod config;
pub mod environment;
pub mod telemetry;
pub mod webhook_config;

pub use app::{Application, StartError};
pub use config::Config;
