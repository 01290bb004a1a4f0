//! Channel history in Redis: per channel, a hash with its epoch and latest offset and a stream
//! of its last messages, written by the same Lua script that publishes, so a message is in the
//! history if and only if it was published, and offsets follow publication order.
//!
//! Keys share the hash tag `{<channel>}`, which hashes to the slot of the channel itself, so on
//! a cluster both keys and the sharded channel live on one node and one script can append and
//! `SPUBLISH` (a webhook's delivery key carries its tenant channel's tag for the same reason):
//! - `lq-realtime:{tenant:acme}:position` — hash: `e` epoch, `s` latest offset;
//! - `lq-realtime:{tenant:acme}:history` — stream: entry id `<offset>-0`, fields `t` (Redis
//!   time in seconds when appended) and `m` (the published message).
//!
//! Both expire `HISTORY_TTL_SECS` after the channel's last publish (the position also after
//! its last read); an entry older than that is never replayed. A channel whose position is
//! gone (expired, or Redis lost its data) starts a new epoch at offset 0.

use std::sync::LazyLock;

use application::ports::{DeliveryRecord, HistoryRead};
use bytes::Bytes;
use deadpool_redis::redis::{Script, Value};
use domain::{Channel, StreamPosition};

use super::delivery_log::key as delivery_key;
use super::{RedisError, Shared};
use domain::envelope::open_envelope;

/// The scripts that publish, with `PUBLISH` on one Redis or `SPUBLISH` on a cluster, where
/// the channel hashes to the slot of the keys (see the module's documentation).
struct PublishScripts {
    publish: Script,
    publish_recorded: Script,
}

impl PublishScripts {
    fn with(command: &str) -> Self {
        Self {
            publish: Script::new(&PUBLISH.replace("PUBLISH_COMMAND", command)),
            publish_recorded: Script::new(&PUBLISH_RECORDED.replace("PUBLISH_COMMAND", command)),
        }
    }
}

static PLAIN: LazyLock<PublishScripts> = LazyLock::new(|| PublishScripts::with("PUBLISH"));
static SHARDED: LazyLock<PublishScripts> = LazyLock::new(|| PublishScripts::with("SPUBLISH"));

/// KEYS: position hash, history stream, optionally a webhook delivery key. ARGV: channel,
/// envelope without its closing brace, history size, TTL in seconds, epoch to start when the
/// channel has none, and with a delivery key its message id and seconds to keep it.
/// Publishes the envelope with `"offset"` and `"epoch"` added, records the delivery; returns
/// {offset, epoch}. The offset is taken only once the message is in the stream: a script that fails
/// on the way (Redis out of memory, a key of another type) leaves no hole in the offsets.
const PUBLISH: &str = r#"
local position = redis.call('HMGET', KEYS[1], 'e', 's')
local epoch = position[1]
local offset = (tonumber(position[2]) or 0) + 1
if not epoch then
  epoch = ARGV[5]
  offset = 1
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 's', 0)
end
local message = ARGV[2] .. string.format(',"offset":%d,"epoch":"', offset) .. epoch .. '"}'
local now = redis.call('TIME')
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], string.format('%d-0', offset), 't', now[1], 'm', message)
redis.call('HSET', KEYS[1], 's', offset)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH_COMMAND', ARGV[1], message)
if KEYS[3] then redis.call('SET', KEYS[3], ARGV[6], 'EX', ARGV[7]) end
return {offset, epoch}
"#;

/// KEYS: a webhook delivery key. ARGV: channel, message, message id, seconds to keep it.
/// Publishes without history and records the delivery.
const PUBLISH_RECORDED: &str = "redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4]) return redis.call('PUBLISH_COMMAND', ARGV[1], ARGV[2])";

/// KEYS: position hash, history stream. ARGV: epoch to start when the channel has none, TTL in
/// seconds, the asked epoch ('' when not asked), the asked offset.
/// Returns {epoch, latest offset, status, messages…}: status -1 not asked, 0 out of reach,
/// 1 the messages after the asked offset follow (none when nothing was missed).
static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local epoch = redis.call('HGET', KEYS[1], 'e')
local top = 0
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 's', 0)
else
  top = tonumber(redis.call('HGET', KEYS[1], 's')) or 0
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
local reply = {epoch, string.format('%d', top), -1}
if ARGV[3] == '' then return reply end
reply[3] = 0
local since = tonumber(ARGV[4])
if ARGV[3] ~= epoch or since == nil or since > top then return reply end
if since == top then reply[3] = 1 return reply end
local entries = redis.call('XRANGE', KEYS[2], string.format('%d-0', since + 1), '+')
local oldest = tonumber(redis.call('TIME')[1]) - tonumber(ARGV[2])
if #entries ~= top - since or tonumber(entries[1][2][2]) <= oldest then return reply end
reply[3] = 1
for i, entry in ipairs(entries) do reply[3 + i] = entry[2][4] end
return reply
"#,
    )
});

fn keys(channel: &str) -> (String, String) {
    (format!("lq-realtime:{{{channel}}}:position"), format!("lq-realtime:{{{channel}}}:history"))
}

impl Shared {
    fn scripts(&self) -> &'static PublishScripts {
        if self.pool.cluster().is_some() { &SHARDED } else { &PLAIN }
    }

    /// Appends `message` to `channel`'s history, publishes it and records `record`, in one
    /// script; returns the position it got.
    pub(super) async fn publish_with_history(
        &self,
        channel: &Channel,
        message: &[u8],
        record: Option<&DeliveryRecord>,
    ) -> Result<StreamPosition, RedisError> {
        let open = open_envelope(message).ok_or(RedisError::NotAnObject)?;
        let name = channel.name();
        let (position, history) = keys(&name);
        let history_settings = self.settings.history;
        let mut invocation = self.scripts().publish.prepare_invoke();
        invocation
            .key(&position)
            .key(history)
            .arg(&name)
            .arg(open)
            .arg(history_settings.size)
            .arg(history_settings.ttl.as_secs().max(1))
            .arg(self.epochs.next());
        if let Some(record) = record {
            invocation
                .key(delivery_key(&record.tenant, &record.delivery_id))
                .arg(record.message_id.as_str())
                .arg(record.keep_secs.max(1));
        }
        match self.timed(self.pool.invoke(&position, &invocation)).await? {
            Value::Array(reply) => match reply.as_slice() {
                [Value::Int(offset), epoch] => {
                    let offset =
                        u64::try_from(*offset).map_err(|_| RedisError::UnexpectedReply("publish"))?;
                    let epoch = text(epoch)
                        .and_then(|e| std::str::from_utf8(e).ok())
                        .ok_or(RedisError::UnexpectedReply("publish"))?;
                    Ok(StreamPosition::new(epoch, offset))
                }
                _ => Err(RedisError::UnexpectedReply("publish")),
            },
            _ => Err(RedisError::UnexpectedReply("publish")),
        }
    }

    /// Publishes `message` without history and records `record`, in one script.
    pub(super) async fn publish_recorded_plain(
        &self,
        channel: &Channel,
        message: &[u8],
        record: &DeliveryRecord,
    ) -> Result<(), RedisError> {
        let delivery = delivery_key(&record.tenant, &record.delivery_id);
        let mut invocation = self.scripts().publish_recorded.prepare_invoke();
        invocation
            .key(&delivery)
            .arg(channel.name())
            .arg(message)
            .arg(record.message_id.as_str())
            .arg(record.keep_secs.max(1));
        self.timed(self.pool.invoke(&delivery, &invocation)).await.map(|_| ())
    }

    /// Reads `channel`'s position and, when `since` is given, what was published after it.
    pub(super) async fn read_history(
        &self,
        channel: &Channel,
        since: Option<StreamPosition>,
    ) -> Result<HistoryRead, RedisError> {
        let (position, history) = keys(&channel.name());
        let (since_epoch, since_offset) = since.map_or((String::new(), 0), |s| (s.epoch, s.offset));
        let mut invocation = READ.prepare_invoke();
        invocation
            .key(&position)
            .key(history)
            .arg(self.epochs.next())
            .arg(self.settings.history.ttl.as_secs().max(1))
            .arg(since_epoch)
            .arg(since_offset);
        let reply = self.timed(self.pool.invoke(&position, &invocation)).await?;
        parse_read(reply).ok_or(RedisError::UnexpectedReply("the history read"))
    }
}

fn text(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        _ => None,
    }
}

fn parse_read(reply: Value) -> Option<HistoryRead> {
    let Value::Array(items) = reply else { return None };
    let epoch = std::str::from_utf8(text(items.first()?)?).ok()?.to_owned();
    let top = std::str::from_utf8(text(items.get(1)?)?).ok()?.parse().ok()?;
    let Value::Int(status) = items.get(2)? else { return None };
    let missed = match status {
        1 => {
            Some(items[3..].iter().map(|m| text(m).map(Bytes::copy_from_slice)).collect::<Option<Vec<_>>>()?)
        }
        _ => None,
    };
    Some(HistoryRead { position: Some(StreamPosition::new(epoch, top)), missed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_a_channel_share_its_hash_tag() {
        assert_eq!(
            keys("tenant:acme"),
            ("lq-realtime:{tenant:acme}:position".to_owned(), "lq-realtime:{tenant:acme}:history".to_owned())
        );
    }

    #[test]
    fn read_replies_are_parsed_and_anything_else_is_refused() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![bulk("e1"), bulk("3"), Value::Int(1), bulk("a"), bulk("b")]);
        let read = parse_read(reply).expect("valid");
        assert_eq!(read.position, Some(StreamPosition::new("e1", 3)));
        assert_eq!(read.missed, Some(vec![Bytes::from("a"), Bytes::from("b")]));
        let reply = Value::Array(vec![bulk("e1"), bulk("3"), Value::Int(0)]);
        assert_eq!(parse_read(reply).expect("valid").missed, None);
        assert_eq!(parse_read(Value::Array(vec![bulk("e1"), bulk("x"), Value::Int(0)])), None);
        assert_eq!(parse_read(Value::Nil), None);
    }
}
