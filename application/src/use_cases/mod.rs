//! The use-cases, one module each.

pub mod connect_client;
pub mod deliver_message;
pub mod disconnect_client;
pub mod handle_client_frame;
pub mod ingest_webhook;
pub mod sweep_inactive;

#[cfg(test)]
pub(crate) mod test_support;
