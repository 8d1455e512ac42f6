//! Group commit for the embedded store.
//!
//! Every durable redb commit syncs the file, which costs far more than the write it
//! carries; one commit per write caps the store at a few hundred writes per second and
//! lets a burst (a thousand sessions ending, an offline flood) queue for seconds. Here
//! one writer thread takes every write waiting, runs them in order in one write
//! transaction and commits once; each caller gets its answer after that commit.
//!
//! A write that fails must not take the others down with it, nor leave half its
//! changes behind: when any write of a batch fails, the transaction is dropped (redb
//! aborts it) and each write of the batch runs again in a transaction of its own. Writes
//! are therefore `Fn`: running one again must do the same thing.

use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use redb::{Database, WriteTransaction};
use tokio::sync::oneshot;

use super::StorageError;

/// Most writes in one transaction.
const MAX_BATCH: usize = 512;

/// A queued write with its reply.
trait Op: Send {
    /// Applies the write in `txn`; false if it failed (its error is kept for the reply).
    fn apply(&mut self, txn: &WriteTransaction) -> bool;
    /// Answers the caller: the write's own result, or `failure` if the batch could not
    /// be committed.
    fn reply(self: Box<Self>, failure: Option<String>);
}

struct Pending<T, F> {
    write: F,
    result: Option<Result<T, StorageError>>,
    reply: oneshot::Sender<Result<T, StorageError>>,
}

impl<T, F> Op for Pending<T, F>
where
    T: Send,
    F: Fn(&WriteTransaction) -> Result<T, StorageError> + Send,
{
    fn apply(&mut self, txn: &WriteTransaction) -> bool {
        let result = (self.write)(txn);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn reply(self: Box<Self>, failure: Option<String>) {
        let result = match (failure, self.result) {
            (Some(msg), _) => Err(StorageError::Backend(msg.into())),
            (None, Some(result)) => result,
            (None, None) => Err(StorageError::Backend("write was not applied".into())),
        };
        // The caller may have gone away (its task ended); the write stands regardless.
        let _ = self.reply.send(result);
    }
}

/// The handle on the writer thread. Dropping it lets the thread finish what is queued
/// and waits for it, so the database is released when the store is.
pub struct Committer {
    queue: Option<mpsc::Sender<Box<dyn Op>>>,
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    pub fn start(db: Arc<Database>) -> std::io::Result<Self> {
        let (queue, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("storage-writer".into())
            .spawn(move || writer(&db, &rx))?;
        Ok(Self {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Runs `write` in the next batch; resolves once that batch is committed.
    pub async fn write<T, F>(&self, write: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: Fn(&WriteTransaction) -> Result<T, StorageError> + Send + 'static,
    {
        let stopped = || StorageError::Backend("the storage writer has stopped".into());
        let (reply, answer) = oneshot::channel();
        let op = Box::new(Pending {
            write,
            result: None,
            reply,
        });
        self.queue
            .as_ref()
            .ok_or_else(stopped)?
            .send(op)
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn writer(db: &Database, rx: &mpsc::Receiver<Box<dyn Op>>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter().take(MAX_BATCH - 1));
        commit(db, batch);
    }
}

/// Runs `batch` in one transaction and answers each write.
fn commit(db: &Database, mut batch: Vec<Box<dyn Op>>) {
    let txn = match db.begin_write() {
        Ok(txn) => txn,
        Err(e) => return fail(batch, format!("cannot begin a write transaction: {e}")),
    };
    if batch.iter_mut().all(|op| op.apply(&txn)) {
        match txn.commit() {
            Ok(()) => batch.into_iter().for_each(|op| op.reply(None)),
            Err(e) => fail(batch, format!("commit failed: {e}")),
        }
    } else {
        // Dropping the transaction aborts it.
        drop(txn);
        if batch.len() == 1 {
            batch.into_iter().for_each(|op| op.reply(None));
        } else {
            for op in batch {
                commit(db, vec![op]);
            }
        }
    }
}

fn fail(batch: Vec<Box<dyn Op>>, msg: String) {
    for op in batch {
        op.reply(Some(msg.clone()));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use redb::TableDefinition;

    use super::*;

    const T: TableDefinition<&str, u64> = TableDefinition::new("t");

    fn put(
        key: &str,
        value: u64,
    ) -> impl Fn(&WriteTransaction) -> Result<u64, StorageError> + use<> {
        let key = key.to_owned();
        move |txn| {
            txn.open_table(T)
                .map_err(|e| StorageError::Backend(Box::new(redb::Error::from(e))))?
                .insert(key.as_str(), value)
                .map_err(|e| StorageError::Backend(Box::new(redb::Error::from(e))))?;
            Ok(value)
        }
    }

    fn read(db: &Database, key: &str) -> Option<u64> {
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(T).ok()?;
        table.get(key).unwrap().map(|v| v.value())
    }

    /// Writes queued behind a slow one are committed together; one that fails leaves
    /// nothing behind and gets its own error, the others their own results.
    #[tokio::test]
    async fn a_failed_write_does_not_spoil_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("db.redb")).unwrap());
        let committer = Committer::start(db.clone()).unwrap();
        let slow = committer.write(|txn| {
            std::thread::sleep(Duration::from_millis(100));
            put("slow", 0)(txn)
        });
        let a = committer.write(put("a", 1));
        let b = committer.write(|txn| -> Result<u64, StorageError> {
            put("b", 2)(txn)?;
            Err(StorageError::AlreadyExists)
        });
        let c = committer.write(put("c", 3));
        let (slow, a, b, c) = tokio::join!(slow, a, b, c);
        assert_eq!(slow.unwrap(), 0);
        assert_eq!(a.unwrap(), 1);
        assert!(matches!(b, Err(StorageError::AlreadyExists)), "{b:?}");
        assert_eq!(c.unwrap(), 3);
        assert_eq!(
            ["slow", "a", "b", "c"].map(|k| read(&db, k)),
            [Some(0), Some(1), None, Some(3)]
        );
    }

    /// Many concurrent writers all get their answers, and dropping the committer
    /// releases the database file.
    #[tokio::test]
    async fn concurrent_writes_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let db = Arc::new(Database::create(&path).unwrap());
        let committer = Arc::new(Committer::start(db.clone()).unwrap());
        let tasks: Vec<_> = (0..300)
            .map(|i| {
                let committer = committer.clone();
                tokio::spawn(async move { committer.write(put(&format!("k{i}"), i)).await })
            })
            .collect();
        for (i, t) in (0..).zip(tasks) {
            assert_eq!(t.await.unwrap().unwrap(), i);
        }
        assert_eq!(read(&db, "k299"), Some(299));
        drop(committer);
        drop(db);
        Database::create(&path).expect("the file is released");
    }
}
