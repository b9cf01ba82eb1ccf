//! The embedded backend: one SQLite file in WAL mode.
//!
//! # Durability
//!
//! `journal_mode=WAL` and `synchronous=FULL`: a commit returns only after the
//! WAL is synced, so nothing acknowledged is lost on a crash or power cut.
//! The cost is one sync per transaction, which ingest amortises by
//! committing whole batches ([`crate::store::IngestStore::commit_batch`]).
//! Foreign keys are enforced; schema changes are versioned migrations.
//!
//! # Concurrency
//!
//! SQLite allows one writer and, in WAL mode, readers alongside it. So:
//!
//! - **one writer thread** owns the only writing connection and runs write
//!   requests one at a time, each in its own `BEGIN IMMEDIATE` transaction;
//! - **a few reader threads** (default 2) each own a `query_only` connection;
//! - both are fed by **bounded** channels: when the writer's queue is full,
//!   callers wait in `send` (backpressure reaches ingest instead of memory
//!   growing), and every caller awaits its answer on a oneshot channel.
//!
//! Dedicated threads rather than `spawn_blocking` keep the connection count
//! and the queue length fixed and keep statement caches warm per connection.
//! A request whose caller stops waiting still runs: a write may commit
//! although its caller was cancelled.

mod api_tokens;
mod claims;
mod codec;
mod control;
mod devices;
mod ingest;
mod ota;
mod outbox;
mod pool;
mod schema;
mod telemetry;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};

pub use schema::SCHEMA_VERSION;

use self::pool::Pool;
use super::{Clock, LABEL_LEN_MAX, Store, StoreError, StoreFuture, SystemClock, UnixMillis};

/// Name of the database file inside the data directory.
pub const DB_FILE_NAME: &str = "wildcam.db";
/// Most outbox destinations.
const DESTINATIONS_MAX: usize = 16;
/// Most reader threads.
const READERS_MAX: usize = 16;

/// How to open a [`SqliteStore`].
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// Directory holding `wildcam.db` (created if missing).
    pub data_dir: PathBuf,
    /// Outbox destinations: each newly stored detection gets one outbox row
    /// per name (empty: no outbox rows).
    pub destinations: Vec<String>,
    /// Write requests that may wait for the writer before callers block.
    pub writer_queue_capacity: usize,
    /// Reader threads (and connections), 1..=16.
    pub readers: usize,
    /// Read requests that may wait for a reader before callers block.
    pub reader_queue_capacity: usize,
    /// How long a connection waits for a lock held by another process.
    pub busy_timeout: Duration,
    /// Source of server timestamps.
    pub clock: Arc<dyn Clock>,
}

impl SqliteConfig {
    /// Defaults for `data_dir`: no destinations, a writer queue of 256,
    /// 2 readers with a queue of 256, a 5 s busy timeout, the system clock.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            destinations: Vec::new(),
            writer_queue_capacity: 256,
            readers: 2,
            reader_queue_capacity: 256,
            busy_timeout: Duration::from_secs(5),
            clock: Arc::new(SystemClock),
        }
    }

    fn validate(&self) -> Result<(), StoreError> {
        if self.writer_queue_capacity == 0 || self.reader_queue_capacity == 0 {
            return Err(StoreError::invalid("queue capacities must be at least 1"));
        }
        if !(1..=READERS_MAX).contains(&self.readers) {
            return Err(StoreError::invalid(format!("readers must be 1..={READERS_MAX}")));
        }
        if self.destinations.len() > DESTINATIONS_MAX {
            return Err(StoreError::invalid(format!("at most {DESTINATIONS_MAX} outbox destinations")));
        }
        let mut names = self.destinations.clone();
        names.sort();
        names.dedup();
        let bad = |n: &String| n.is_empty() || n.len() > LABEL_LEN_MAX || n.chars().any(char::is_control);
        if names.len() != self.destinations.len() || names.iter().any(bad) {
            return Err(StoreError::invalid("outbox destinations must be distinct, non-empty labels"));
        }
        Ok(())
    }
}

/// The SQLite implementation of [`Store`].
#[derive(Debug)]
pub struct SqliteStore {
    writer: Pool,
    readers: Pool,
    clock: Arc<dyn Clock>,
    destinations: Arc<[String]>,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating if needed) `<data_dir>/wildcam.db`, migrates it to
    /// [`SCHEMA_VERSION`] and starts the writer and reader threads.
    ///
    /// Refuses a database written by a newer server
    /// ([`StoreError::SchemaTooNew`]).
    pub async fn open(config: SqliteConfig) -> Result<Self, StoreError> {
        config.validate()?;
        let path = config.data_dir.join(DB_FILE_NAME);
        let (dir, db, readers, busy) =
            (config.data_dir.clone(), path.clone(), config.readers, config.busy_timeout);
        let (writer_conn, reader_conns) =
            tokio::task::spawn_blocking(move || open_connections(&dir, &db, readers, busy))
                .await
                .map_err(|_| StoreError::WorkerFailed)??;
        let writer = Pool::spawn("wildcam-db-writer", vec![writer_conn], config.writer_queue_capacity)?;
        let readers = Pool::spawn("wildcam-db-reader", reader_conns, config.reader_queue_capacity)?;
        tracing::info!(path = %path.display(), "store opened");
        Ok(Self { writer, readers, clock: config.clock, destinations: config.destinations.into(), path })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The configured outbox destinations.
    pub fn destinations(&self) -> &[String] {
        &self.destinations
    }

    /// Runs `f` in a write transaction on the writer thread, with the time.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, UnixMillis) -> Result<T, StoreError> + Send + 'static,
    {
        let clock = Arc::clone(&self.clock);
        self.writer
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let out = f(&tx, clock.now_ms())?;
                tx.commit()?;
                Ok(out)
            })
            .await
    }

    /// Runs `f` on a reader thread, in one read transaction (one snapshot).
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, UnixMillis) -> Result<T, StoreError> + Send + 'static,
    {
        let clock = Arc::clone(&self.clock);
        self.readers
            .call(move |conn| {
                let tx = conn.transaction()?;
                let out = f(&tx, clock.now_ms())?;
                tx.commit()?;
                Ok(out)
            })
            .await
    }

    async fn close_inner(&self) -> Result<(), StoreError> {
        let Some(writer) = self.writer.take_sender()? else {
            return Ok(());
        };
        // The channel is FIFO: this runs after every write queued before it.
        pool::submit(&writer, schema::checkpoint).await?;
        drop(writer);
        drop(self.readers.take_sender()?);
        let mut threads = self.writer.take_threads()?;
        threads.extend(self.readers.take_threads()?);
        let all_clean = tokio::task::spawn_blocking(move || threads.into_iter().all(|t| t.join().is_ok()))
            .await
            .map_err(|_| StoreError::WorkerFailed)?;
        tracing::info!(path = %self.path.display(), "store closed");
        if all_clean { Ok(()) } else { Err(StoreError::WorkerFailed) }
    }
}

impl Store for SqliteStore {
    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.close_inner())
    }
}

/// Creates the directory, opens and migrates the writer connection, then
/// opens the readers (only once the schema is known to be ours).
fn open_connections(
    dir: &Path,
    db: &Path,
    readers: usize,
    busy: Duration,
) -> Result<(Connection, Vec<Connection>), StoreError> {
    std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir { path: dir.to_owned(), source })?;
    let writer = schema::open_writer(db, busy)?;
    let readers = (0..readers)
        .map(|_| schema::open_reader(db, busy))
        .collect::<Result<_, _>>()?;
    Ok((writer, readers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        let ok = SqliteConfig::new("/tmp/x");
        assert!(ok.validate().is_ok());
        assert!(
            SqliteConfig { writer_queue_capacity: 0, ..ok.clone() }
                .validate()
                .is_err()
        );
        assert!(
            SqliteConfig { readers: 0, ..ok.clone() }
                .validate()
                .is_err()
        );
        let twice = vec!["aws".to_owned(), "aws".to_owned()];
        assert!(
            SqliteConfig { destinations: twice, ..ok.clone() }
                .validate()
                .is_err()
        );
        assert!(
            SqliteConfig { destinations: vec![String::new()], ..ok }
                .validate()
                .is_err()
        );
    }
}
