//! `notifications.sqlite3`: webhook subscriptions, and every subscriber's checkpoint and delivery
//! status. Each write is its own transaction, synced (`synchronous=FULL`): a checkpoint that
//! says a change was delivered survives a crash, and one lost in a crash only repeats a delivery.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use super::change::Filter;
use super::NotifyError;

pub const FILE: &str = "notifications.sqlite3";

/// A stored webhook subscription (with its secret: only the delivery uses it).
#[derive(Debug, Clone)]
pub struct WebhookRecord {
    pub id: String,
    pub url: String,
    pub filter: Filter,
    pub secret: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Where a subscriber is, and how its deliveries went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// Every matching change at or below this store position has been delivered.
    pub position: u64,
    pub delivered: u64,
    /// Failed attempts at the change it is on now; 0 once it is delivered.
    pub attempts: u32,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub last_delivered_at: Option<DateTime<Utc>>,
    /// `(alarm id, sequence)` of the last change delivered.
    pub last_delivered: Option<(String, u32)>,
}

pub struct State {
    conn: Mutex<Connection>,
}

fn time(text: Option<String>) -> Option<DateTime<Utc>> {
    text.and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
        .map(|t| t.with_timezone(&Utc))
}

impl State {
    pub fn open(dir: &Path) -> Result<State, NotifyError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE);
        let conn = Connection::open(&path)?;
        // Webhook secrets are in it.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS webhooks (
                 id TEXT PRIMARY KEY,
                 url TEXT NOT NULL,
                 filter TEXT NOT NULL,
                 secret TEXT,
                 created_at TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS subscribers (
                 name TEXT PRIMARY KEY,
                 position INTEGER NOT NULL,
                 delivered INTEGER NOT NULL DEFAULT 0,
                 attempts INTEGER NOT NULL DEFAULT 0,
                 last_error TEXT,
                 last_error_at TEXT,
                 last_delivered_at TEXT,
                 last_alarm_id TEXT,
                 last_sequence INTEGER
             );",
        )?;
        Ok(State {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding it leaves SQLite consistent (each write is a transaction).
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores a webhook and its subscriber, starting after `position`, unless `max` webhooks
    /// exist.
    pub fn insert_webhook(
        &self,
        hook: &WebhookRecord,
        position: u64,
        max: usize,
    ) -> Result<(), NotifyError> {
        let filter = serde_json::to_string(&hook.filter)?;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let count: i64 = tx.query_row("SELECT COUNT(*) FROM webhooks", [], |r| r.get(0))?;
        if count as usize >= max {
            return Err(NotifyError::TooMany);
        }
        tx.execute(
            "INSERT INTO webhooks (id, url, filter, secret, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![hook.id, hook.url, filter, hook.secret, hook.created_at.to_rfc3339()],
        )?;
        tx.execute(
            "INSERT OR REPLACE INTO subscribers (name, position) VALUES (?1, ?2)",
            params![webhook_subscriber(&hook.id), position as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Every webhook, oldest first.
    pub fn webhooks(&self) -> Result<Vec<WebhookRecord>, NotifyError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT id, url, filter, secret, created_at FROM webhooks ORDER BY created_at, id",
        )?;
        let rows = statement.query_map([], row_to_raw)?;
        rows.map(|row| raw_to_record(row?)).collect()
    }

    pub fn webhook(&self, id: &str) -> Result<Option<WebhookRecord>, NotifyError> {
        let raw = self
            .conn()
            .query_row(
                "SELECT id, url, filter, secret, created_at FROM webhooks WHERE id = ?1",
                [id],
                row_to_raw,
            )
            .optional()?;
        raw.map(raw_to_record).transpose()
    }

    /// Removes a webhook and its subscriber; whether it existed.
    pub fn delete_webhook(&self, id: &str) -> Result<bool, NotifyError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let removed = tx.execute("DELETE FROM webhooks WHERE id = ?1", [id])?;
        tx.execute(
            "DELETE FROM subscribers WHERE name = ?1",
            [webhook_subscriber(id)],
        )?;
        tx.commit()?;
        Ok(removed > 0)
    }

    /// The subscriber's checkpoint; created at `start` if it has none.
    pub fn ensure_subscriber(&self, name: &str, start: u64) -> Result<u64, NotifyError> {
        let conn = self.conn();
        conn.execute(
            "INSERT OR IGNORE INTO subscribers (name, position) VALUES (?1, ?2)",
            params![name, start as i64],
        )?;
        let position: i64 = conn.query_row(
            "SELECT position FROM subscribers WHERE name = ?1",
            [name],
            |r| r.get(0),
        )?;
        Ok(position as u64)
    }

    pub fn progress(&self, name: &str) -> Result<Option<Progress>, NotifyError> {
        let progress = self
            .conn()
            .query_row(
                "SELECT position, delivered, attempts, last_error, last_error_at,
                        last_delivered_at, last_alarm_id, last_sequence
                 FROM subscribers WHERE name = ?1",
                [name],
                |r| {
                    let alarm: Option<String> = r.get(6)?;
                    let sequence: Option<u32> = r.get(7)?;
                    Ok(Progress {
                        position: r.get::<_, i64>(0)? as u64,
                        delivered: r.get::<_, i64>(1)? as u64,
                        attempts: r.get(2)?,
                        last_error: r.get(3)?,
                        last_error_at: time(r.get(4)?),
                        last_delivered_at: time(r.get(5)?),
                        last_delivered: alarm.zip(sequence),
                    })
                },
            )
            .optional()?;
        Ok(progress)
    }

    /// Moves the checkpoint past events that matched nothing.
    pub fn advance(&self, name: &str, position: u64) -> Result<(), NotifyError> {
        self.conn().execute(
            "UPDATE subscribers SET position = MAX(position, ?2) WHERE name = ?1",
            params![name, position as i64],
        )?;
        Ok(())
    }

    /// Records delivered changes, the last of them `last` at `position`: the new checkpoint.
    pub fn delivered(
        &self,
        name: &str,
        position: u64,
        count: u64,
        last: (&str, u32),
    ) -> Result<(), NotifyError> {
        self.conn().execute(
            "UPDATE subscribers SET position = MAX(position, ?2), delivered = delivered + ?3,
                 attempts = 0, last_delivered_at = ?4, last_alarm_id = ?5, last_sequence = ?6
             WHERE name = ?1",
            params![
                name,
                position as i64,
                count as i64,
                Utc::now().to_rfc3339(),
                last.0,
                last.1
            ],
        )?;
        Ok(())
    }

    /// Records a failed attempt.
    pub fn failed(&self, name: &str, attempts: u32, error: &str) -> Result<(), NotifyError> {
        self.conn().execute(
            "UPDATE subscribers SET attempts = ?2, last_error = ?3, last_error_at = ?4
             WHERE name = ?1",
            params![name, attempts, error, Utc::now().to_rfc3339()],
        )?;
        Ok(())
    }
}

/// The subscriber name of a webhook.
pub fn webhook_subscriber(id: &str) -> String {
    format!("webhook:{id}")
}

type RawRow = (String, String, String, Option<String>, String);

fn row_to_raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn raw_to_record(
    (id, url, filter, secret, created_at): RawRow,
) -> Result<WebhookRecord, NotifyError> {
    Ok(WebhookRecord {
        id,
        url,
        filter: serde_json::from_str(&filter)?,
        secret,
        created_at: time(Some(created_at)).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhooks_and_checkpoints_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let hook = WebhookRecord {
            id: "a".into(),
            url: "http://127.0.0.1:9/hook".into(),
            filter: Filter::default(),
            secret: Some("s".into()),
            created_at: Utc::now(),
        };
        {
            let state = State::open(dir.path()).unwrap();
            state.insert_webhook(&hook, 7, 1).unwrap();
            let mut second = hook.clone();
            second.id = "b".into();
            assert!(matches!(
                state.insert_webhook(&second, 7, 1),
                Err(NotifyError::TooMany)
            ));
            let name = webhook_subscriber("a");
            state.failed(&name, 2, "HTTP 500").unwrap();
            state.delivered(&name, 12, 1, ("truck-7.1", 1)).unwrap();
            state.advance(&name, 10).unwrap();
            assert_eq!(state.ensure_subscriber("amqp:x", 30).unwrap(), 30);
        }
        let state = State::open(dir.path()).unwrap();
        let progress = state.progress(&webhook_subscriber("a")).unwrap().unwrap();
        assert_eq!(progress.position, 12, "a checkpoint never goes back");
        assert_eq!(progress.attempts, 0);
        assert_eq!(progress.last_error.as_deref(), Some("HTTP 500"));
        assert_eq!(progress.last_delivered, Some(("truck-7.1".into(), 1)));
        assert_eq!(state.ensure_subscriber("amqp:x", 99).unwrap(), 30);
        assert_eq!(state.webhooks().unwrap()[0].secret.as_deref(), Some("s"));
        assert!(state.delete_webhook("a").unwrap());
        assert!(state.progress(&webhook_subscriber("a")).unwrap().is_none());
        assert!(!state.delete_webhook("a").unwrap());
    }
}
