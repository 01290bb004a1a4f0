//! `RedisPresence`: who is online, shared by every instance.
//!
//! Per scope, with its presence channel's name as the hash tag (`{presence:<tenant>}` for a
//! tenant, `{presence:<tenant>:<topic>}` for a topic, so the topics of a tenant spread over a
//! Cluster's masters):
//! - `lq-realtime:{presence:acme}:users` — set: the users announced as present;
//! - `lq-realtime:{presence:acme}:<user>` — hash: instance id → `<connections>:<expiry ms>`.
//!
//! Each instance sets its own entries again well within the TTL; an entry past its expiry
//! counts for nothing. A user joins when it enters the set and leaves when it leaves it, both
//! decided inside one script, so every join and every leave is announced once.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use application::ports::{BrokerError, Presence, PresenceChange, PresentUser};
use async_trait::async_trait;
use deadpool_redis::redis::{Script, Value};
use domain::{PresenceScope, UserId};

use super::{RedisError, Shared};

/// Counts the live connections in a user's hash, deleting expired entries when asked.
const LIVE: &str = r"
local function live(key, now, prune)
  local fields = redis.call('HGETALL', key)
  local n = 0
  for i = 1, #fields, 2 do
    local count, exp = string.match(fields[i + 1], '^(%d+):(%d+)$')
    if count ~= nil and tonumber(exp) > now then
      n = n + tonumber(count)
    elseif prune then
      redis.call('HDEL', key, fields[i])
    end
  end
  return n
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// KEYS: users set, user hash. ARGV: instance, connections, TTL ms, user.
/// Returns 1 joined, -1 left, 0 unchanged.
static SET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LIVE}{}",
        r"
local before = redis.call('SISMEMBER', KEYS[1], ARGV[4]) == 1
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ':' .. string.format('%d', now + tonumber(ARGV[3])))
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) * 2)
else
  redis.call('HDEL', KEYS[2], ARGV[1])
end
if live(KEYS[2], now, true) > 0 then
  redis.call('SADD', KEYS[1], ARGV[4])
  if before then return 0 end
  return 1
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[1], ARGV[4])
if before then return -1 end
return 0
"
    ))
});

/// KEYS: users set. ARGV: the users' key prefix. Returns {user, connections, …}.
static LIST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LIVE}{}",
        r"
local out = {}
for _, user in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local n = live(ARGV[1] .. user, now, false)
  if n > 0 then
    table.insert(out, user)
    table.insert(out, n)
  end
end
return out
"
    ))
});

/// KEYS: users set. ARGV: the users' key prefix. Removes and returns the users without a live
/// entry.
static SWEEP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LIVE}{}",
        r"
local gone = {}
for _, user in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if live(ARGV[1] .. user, now, true) == 0 then
    redis.call('DEL', ARGV[1] .. user)
    redis.call('SREM', KEYS[1], user)
    table.insert(gone, user)
  end
end
return gone
"
    ))
});

fn prefix(scope: &PresenceScope) -> String {
    // Ids and topic names hold no ':' nor braces: a scope's keys cannot collide with another's.
    format!("lq-realtime:{{{scope}}}:")
}

/// The presence store of a [`super::RedisBroker`], on its publish pool.
pub struct RedisPresence {
    pub(super) shared: Arc<Shared>,
    /// Whose entries this store sets: the broker's instance id.
    pub(super) instance: Arc<str>,
    pub(super) ttl: Duration,
}

impl std::fmt::Debug for RedisPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPresence").field("instance", &self.instance).field("ttl", &self.ttl).finish()
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

fn unexpected() -> BrokerError {
    RedisError::UnexpectedReply("a presence script").into()
}

#[async_trait]
impl Presence for RedisPresence {
    async fn set(
        &self,
        scope: &PresenceScope,
        user: &UserId,
        connections: usize,
    ) -> Result<PresenceChange, BrokerError> {
        let prefix = prefix(scope);
        let mut invocation = SET.prepare_invoke();
        let users = format!("{prefix}users");
        invocation
            .key(&users)
            .key(format!("{prefix}{user}"))
            .arg(&*self.instance)
            .arg(connections)
            .arg(u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX))
            .arg(user.as_str());
        match self.shared.timed(self.shared.pool.invoke(&users, &invocation)).await? {
            Value::Int(1) => Ok(PresenceChange::Joined),
            Value::Int(-1) => Ok(PresenceChange::Left),
            Value::Int(_) => Ok(PresenceChange::Unchanged),
            _ => Err(unexpected()),
        }
    }

    async fn list(&self, scope: &PresenceScope) -> Result<Vec<PresentUser>, BrokerError> {
        let prefix = prefix(scope);
        let mut invocation = LIST.prepare_invoke();
        let users = format!("{prefix}users");
        invocation.key(&users).arg(&prefix);
        let Value::Array(items) = self.shared.timed(self.shared.pool.invoke(&users, &invocation)).await?
        else {
            return Err(unexpected());
        };
        items
            .chunks(2)
            .map(|pair| {
                let user = pair.first().and_then(text).and_then(|u| UserId::parse(&u).ok());
                let connections = match pair.get(1) {
                    Some(Value::Int(n)) => usize::try_from(*n).ok(),
                    _ => None,
                };
                user.zip(connections).map(|(user_id, connections)| PresentUser { user_id, connections })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(unexpected)
    }

    async fn sweep(&self, scope: &PresenceScope) -> Result<Vec<UserId>, BrokerError> {
        let prefix = prefix(scope);
        let mut invocation = SWEEP.prepare_invoke();
        let users = format!("{prefix}users");
        invocation.key(&users).arg(&prefix);
        let Value::Array(items) = self.shared.timed(self.shared.pool.invoke(&users, &invocation)).await?
        else {
            return Err(unexpected());
        };
        Ok(items.iter().filter_map(text).filter_map(|u| UserId::parse(&u).ok()).collect())
    }
}
