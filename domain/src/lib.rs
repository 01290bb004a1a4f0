//! The domain of lq-realtime: the rules that hold whatever the transport or the broker.
//!
//! This crate is pure: no I/O, no async runtime, no network types. It may depend on `serde`,
//! `serde_json` and `thiserror` only. Everything else in the workspace depends on it.
//!
//! # Layout
//! - [`activity`]: counts over a sliding minute and the heaviest keys, in bounded memory.
//! - [`id`]: validated identifiers (`TenantId`, `UserId`, `ConnectionId`, `MessageId`, `Provider`).
//! - [`channel`]: the channels a message travels on and their wire names.
//! - [`time`]: `Timestamp` and its RFC 3339 form.
//! - [`envelope`]: the message format every server→client frame and every broker message uses.
//! - [`identity`]: what a token must claim to become an `Identity`, and the scope check.
//! - [`origin`]: which web pages may open a session.
//! - [`permissions`]: what a token allows on topics (`caps`, subscription tokens).
//! - [`protocol`]: client→server frames, error codes and close reasons.
//! - [`rate_limit`]: the per-connection token bucket.
//! - [`position`]: a message's offset and epoch in its channel's history.
//! - [`continuity`]: whether a received message follows the one before it on its channel.
//! - [`registry`]: the connection registry and its first/last-connection events.

pub mod activity;
pub mod channel;
pub mod continuity;
pub mod envelope;
pub mod id;
pub mod identity;
pub mod origin;
pub mod permissions;
pub mod position;
pub mod protocol;
pub mod rate_limit;
pub mod registry;
pub mod time;

#[cfg(test)]
mod fuzz;

pub use channel::{Channel, ChannelError, PresenceScope};
pub use continuity::{ChannelContinuity, Continuity};
pub use envelope::{Envelope, InboundEnvelope};
pub use id::{ConnectionId, IdError, MessageId, Provider, TenantId, TopicName, UserId};
pub use identity::{Claims, ClaimsError, Identity, SCOPE_WS_CONNECT};
pub use origin::OriginPolicy;
pub use permissions::{Allowed, Capability, Caps, PermissionError};
pub use position::{PositionError, StreamPosition};
pub use protocol::{ClientCommand, CloseReason, ErrorCode, ProtocolError, UnsubscribeReason};
pub use rate_limit::{RateDecision, TokenBucket};
pub use registry::{ConnectionInfo, ConnectionRegistry, RegistryError, SubscribeError};
pub use time::Timestamp;
