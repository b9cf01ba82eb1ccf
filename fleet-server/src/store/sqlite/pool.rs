//! Threads owning SQLite connections, fed by a bounded channel.
//!
//! Each pool has one bounded tokio channel of jobs shared by its threads
//! (one thread for the writer, a few for readers). A caller sends a job and
//! awaits its answer on a oneshot channel; a full channel makes the caller
//! wait in `send`, which is the backpressure.

use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::store::StoreError;

/// Work for a connection thread.
type Job = Box<dyn FnOnce(&mut Connection) + Send + 'static>;
/// The sending half of a pool's queue.
pub(super) type JobSender = mpsc::Sender<Job>;

/// A fixed set of threads, each owning one connection, sharing one queue.
#[derive(Debug)]
pub(super) struct Pool {
    sender: Mutex<Option<JobSender>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    /// Starts one thread per connection, named `{name}-{i}`, with a queue of
    /// `capacity` jobs.
    pub(super) fn spawn(
        name: &str,
        connections: Vec<Connection>,
        capacity: usize,
    ) -> Result<Self, StoreError> {
        let (sender, receiver) = mpsc::channel::<Job>(capacity);
        let receiver = Arc::new(Mutex::new(receiver));
        let mut threads = Vec::with_capacity(connections.len());
        for (i, conn) in connections.into_iter().enumerate() {
            let receiver = Arc::clone(&receiver);
            let thread = thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || run(conn, &receiver))
                .map_err(StoreError::Thread)?;
            threads.push(thread);
        }
        Ok(Self { sender: Mutex::new(Some(sender)), threads: Mutex::new(threads) })
    }

    /// Runs `f` on one of the pool's connections and returns its result.
    /// Waits while the queue is full.
    pub(super) async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let sender = self.sender()?;
        submit(&sender, f).await
    }

    /// A handle on the queue, or `Closed`.
    fn sender(&self) -> Result<JobSender, StoreError> {
        self.sender
            .lock()
            .map_err(|_| StoreError::Poisoned)?
            .clone()
            .ok_or(StoreError::Closed)
    }

    /// Stops accepting calls; the threads end once the returned sender and
    /// every in-flight call's copy are dropped and the queue is drained.
    pub(super) fn take_sender(&self) -> Result<Option<JobSender>, StoreError> {
        Ok(self.sender.lock().map_err(|_| StoreError::Poisoned)?.take())
    }

    /// The threads, to join after [`take_sender`](Self::take_sender).
    pub(super) fn take_threads(&self) -> Result<Vec<JoinHandle<()>>, StoreError> {
        Ok(std::mem::take(&mut *self.threads.lock().map_err(|_| StoreError::Poisoned)?))
    }
}

/// Queues `f` on `sender` and awaits its result.
pub(super) async fn submit<T, F>(sender: &JobSender, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
{
    let (reply, answer) = oneshot::channel();
    let job: Job = Box::new(move |conn| {
        // The caller may have stopped waiting; the work is done regardless.
        let _ = reply.send(f(conn));
    });
    sender.send(job).await.map_err(|_| StoreError::Closed)?;
    // A dropped reply means the job panicked (the thread survives it).
    answer.await.map_err(|_| StoreError::WorkerFailed)?
}

/// A connection thread: runs jobs until the queue is closed and drained.
fn run(mut conn: Connection, jobs: &Mutex<mpsc::Receiver<Job>>) {
    while let Some(job) = next_job(jobs) {
        // An open transaction is rolled back while unwinding (its Drop).
        if panic::catch_unwind(AssertUnwindSafe(|| job(&mut conn))).is_err() {
            tracing::error!("a storage job panicked; its caller gets WorkerFailed");
        }
    }
}

/// Waits for the next job; `None` once the queue is closed and empty (or the
/// shared receiver's lock is poisoned, which ends the thread).
fn next_job(jobs: &Mutex<mpsc::Receiver<Job>>) -> Option<Job> {
    jobs.lock().ok()?.blocking_recv()
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc as std_mpsc;
    use std::time::Duration;

    use super::*;

    fn pool(capacity: usize) -> Pool {
        Pool::spawn("test", vec![Connection::open_in_memory().unwrap()], capacity).unwrap()
    }

    #[tokio::test]
    async fn runs_jobs_and_returns_results() {
        let pool = pool(4);
        let n: i64 = pool
            .call(|conn| Ok(conn.query_row("SELECT 40 + 2", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(n, 42);
    }

    #[tokio::test]
    async fn full_queue_makes_callers_wait() {
        let pool = Arc::new(pool(2));
        let (started_tx, started_rx) = std_mpsc::channel::<()>();
        let (gate_tx, gate_rx) = std_mpsc::channel::<()>();
        // Job 1 occupies the only thread until the gate opens.
        let blocker = tokio::spawn({
            let pool = Arc::clone(&pool);
            async move {
                pool.call(move |_| {
                    started_tx.send(()).ok();
                    gate_rx.recv().ok();
                    Ok(())
                })
                .await
            }
        });
        tokio::task::spawn_blocking(move || started_rx.recv())
            .await
            .unwrap()
            .unwrap();
        // Jobs 2 and 3 fill the queue of 2; job 4 must wait for room.
        let queued: Vec<_> = (0..3)
            .map(|i| {
                let pool = Arc::clone(&pool);
                tokio::spawn(async move { pool.call(move |_| Ok(i)).await })
            })
            .collect();
        let sender = pool.sender().unwrap();
        assert_eq!(sender.max_capacity(), 2);
        let filled = async {
            while sender.capacity() > 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), filled)
            .await
            .expect("the queue fills up");
        // Two jobs wait in the queue, the third caller waits for room: none can finish.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(sender.capacity(), 0);
        assert!(queued.iter().all(|t| !t.is_finished()));
        drop(sender);
        gate_tx.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        for (i, task) in queued.into_iter().enumerate() {
            assert_eq!(task.await.unwrap().unwrap(), i);
        }
    }

    #[tokio::test]
    async fn a_panicking_job_fails_its_caller_only() {
        let pool = pool(2);
        let failed = pool.call::<(), _>(|_| panic!("boom")).await;
        assert!(matches!(failed, Err(StoreError::WorkerFailed)));
        assert_eq!(pool.call(|_| Ok(1)).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn closed_pool_refuses_calls_and_threads_end() {
        let pool = pool(2);
        drop(pool.take_sender().unwrap());
        assert!(matches!(pool.call(|_| Ok(())).await, Err(StoreError::Closed)));
        for thread in pool.take_threads().unwrap() {
            thread.join().unwrap();
        }
    }
}
