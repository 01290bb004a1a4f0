//! Outbound adapters: implementations of the application's ports.

pub mod delivery_log;
pub mod history;
pub mod jwt;
pub mod memory;
pub mod postgres;
pub mod presence;
pub mod prometheus;
pub mod redis;
pub mod signatures;
pub mod system;
