//! The tables, created by migrations embedded in the binary and applied at start.
//!
//! Each migration runs once, in order, in a transaction that holds an advisory lock, so
//! instances starting together apply it once; `lq_schema_migrations` records which ran.
//!
//! - `lq_messages`: one row per message with a position — its channel, epoch and offset
//!   (unique: a message appended twice is kept once), the bytes clients received, and when it
//!   was kept (what the retention prunes by).
//! - `lq_epochs`: per channel, the order in which its epochs began, so a history page can run
//!   across epochs in publication order.
//! - `lq_outbox`: the rows backends insert in their own transactions (`channel`, `type`,
//!   `payload`, `idempotency_key`), with a trigger that notifies `lq_outbox` after each insert.

use deadpool_postgres::Client;

use super::PostgresError;

/// `pg_advisory_xact_lock` key of the migrations ("lqschema" in ASCII).
const MIGRATION_LOCK: i64 = 0x6c71_7363_6865_6d61;

/// Each migration's version and statements, in order. Never edit one that was released: add
/// the next.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
CREATE TABLE lq_messages (
    seq bigserial PRIMARY KEY,
    channel text NOT NULL,
    epoch text NOT NULL,
    "offset" bigint NOT NULL,
    message bytea NOT NULL,
    kept_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (channel, epoch, "offset")
);
CREATE SEQUENCE lq_epoch_order;
CREATE TABLE lq_epochs (
    channel text NOT NULL,
    epoch text NOT NULL,
    began bigint NOT NULL DEFAULT nextval('lq_epoch_order'),
    PRIMARY KEY (channel, epoch)
);
"#,
    ),
    (
        2,
        r#"
CREATE TABLE lq_outbox (
    id bigserial PRIMARY KEY,
    channel text NOT NULL,
    type text NOT NULL,
    payload json NOT NULL,
    idempotency_key text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX lq_outbox_channel_id ON lq_outbox (channel, id);
CREATE FUNCTION lq_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('lq_outbox', TG_TABLE_NAME);
    RETURN NULL;
END
$$;
CREATE TRIGGER lq_outbox_notify AFTER INSERT ON lq_outbox FOR EACH STATEMENT EXECUTE FUNCTION lq_outbox_notify();
"#,
    ),
];

/// Applies the migrations `client`'s database has not run yet; returns how many it applied.
///
/// # Errors
/// [`PostgresError::Query`] naming the migration that failed; nothing of it is applied then.
pub(super) async fn migrate(client: &mut Client) -> Result<usize, PostgresError> {
    let transaction = client.transaction().await.map_err(|e| PostgresError::query("a migration", &e))?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| PostgresError::query("the migrations' lock", &e))?;
    transaction
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS lq_schema_migrations \
             (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(|e| PostgresError::query("lq_schema_migrations", &e))?;
    let applied: Vec<i32> = transaction
        .query("SELECT version FROM lq_schema_migrations", &[])
        .await
        .map_err(|e| PostgresError::query("lq_schema_migrations", &e))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut count = 0;
    for (version, statements) in MIGRATIONS.iter().filter(|(v, _)| !applied.contains(v)) {
        transaction
            .batch_execute(statements)
            .await
            .map_err(|e| PostgresError::query(&format!("migration {version}"), &e))?;
        transaction
            .execute("INSERT INTO lq_schema_migrations (version) VALUES ($1)", &[version])
            .await
            .map_err(|e| PostgresError::query(&format!("migration {version}"), &e))?;
        count += 1;
    }
    transaction.commit().await.map_err(|e| PostgresError::query("the migrations", &e))?;
    Ok(count)
}
