//! Adapters of lq-realtime: the technologies behind the application's ports.
//!
//! May depend on `domain`, `application` and any transport or broker library; nothing here is
//! known to the inner crates. Each adapter lives in a module named after its technology.
//!
//! # Layout
//! - [`inbound::http`]: the warp HTTP surface — `/health`, `/ready`, `/webhooks/{provider}`, and
//!   the error mapping shared by every route.
//! - [`inbound::ws`]: the WebSocket endpoint `/ws`: its own upgrade on top of hyper, and the
//!   per-connection loop with a bounded outbound queue.
//! - [`outbound::memory`]: `InMemoryBroker`, the single-instance broker.
//! - [`outbound::redis`]: `RedisBroker` on one Redis, a Sentinel-managed master or a Redis
//!   Cluster (a subscriber module per topology, one probe tracker), with `RedisPresence` and
//!   `RedisDeliveryLog` on its pools; its failures are one `RedisError`.
//! - [`outbound::jwt`]: `JwtVerifier` (HS256 only) and `JwtIssuer`.
//! - [`outbound::signatures`]: `SignatureVerifier` (hmac-sha256, GitHub, Stripe and Standard
//!   Webhooks signatures, several secrets per provider, constant-time).
//! - [`outbound::system`]: `SystemClock` and `RandomIdGenerator`.

pub mod inbound;
pub mod outbound;
