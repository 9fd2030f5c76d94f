//! What a store's writer is asked to do, and how each command is answered: shared by the
//! backends, whose writers both take commands in call order and write them in batches.

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;

use super::{Appended, NewEvent, Pruned, Snapshot, StoreError, StoreResult, StreamAt, Wake};

pub(crate) enum WriteCommand {
    Append {
        stream: String,
        expected: u64,
        events: Vec<NewEvent>,
        condition: Option<StreamAt>,
        wake: Wake,
        reply: oneshot::Sender<StoreResult<Appended>>,
    },
    Snapshot {
        snapshot: Snapshot,
        reply: oneshot::Sender<StoreResult<()>>,
    },
    Flush {
        reply: oneshot::Sender<StoreResult<()>>,
    },
    Prune {
        event_types: &'static [&'static str],
        before: DateTime<Utc>,
        after: u64,
        max_streams: usize,
        reply: oneshot::Sender<StoreResult<Pruned>>,
    },
}

impl WriteCommand {
    /// Answers the caller with `error`.
    pub(crate) fn fail(self, error: StoreError) {
        match self {
            WriteCommand::Append { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            WriteCommand::Snapshot { reply, .. } | WriteCommand::Flush { reply } => {
                let _ = reply.send(Err(error));
            }
            WriteCommand::Prune { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }

    /// The events it appends.
    pub(crate) fn event_count(&self) -> usize {
        match self {
            WriteCommand::Append { events, .. } => events.len(),
            _ => 0,
        }
    }

    /// Answers the caller once the batch that staged it as `staged` has committed.
    pub(crate) fn answer(self, staged: Staged) {
        match (self, staged) {
            (WriteCommand::Append { reply, .. }, Staged::Appended(a)) => {
                let _ = reply.send(Ok(a));
            }
            (WriteCommand::Append { reply, .. }, Staged::Conflict(e)) => {
                let _ = reply.send(Err(e));
            }
            (WriteCommand::Snapshot { reply, .. }, _) | (WriteCommand::Flush { reply }, _) => {
                let _ = reply.send(Ok(()));
            }
            (WriteCommand::Prune { reply, .. }, Staged::Pruned(pruned)) => {
                let _ = reply.send(Ok(pruned));
            }
            (WriteCommand::Prune { reply, .. }, _) => {
                let _ = reply.send(Ok(Pruned::default()));
            }
            // Never staged so: a safeguard rather than a panic.
            (WriteCommand::Append { reply, .. }, Staged::Done | Staged::Pruned(_)) => {
                let _ = reply.send(Err(StoreError::Refused("internal: unstaged append".into())));
            }
        }
    }
}

/// Why an append may not go ahead, if it may not: the stream its condition names is not at that
/// version (`condition_actual` is where it is), or its own stream is not at `expected`
/// (`actual`). Both writers check appends with this, each against its own view of the versions.
pub(crate) fn append_conflict(
    stream: &str,
    expected: u64,
    actual: u64,
    condition: Option<&StreamAt>,
    condition_actual: u64,
) -> Option<StoreError> {
    if let Some(condition) = condition.filter(|c| c.version != condition_actual) {
        return Some(StoreError::Conflict {
            stream: condition.stream.to_owned(),
            expected: condition.version,
            actual: condition_actual,
        });
    }
    (actual != expected).then(|| StoreError::Conflict {
        stream: stream.to_owned(),
        expected,
        actual,
    })
}

/// What one command in a batch came to, before the commit decides whether it stands.
pub(crate) enum Staged {
    Appended(Appended),
    Conflict(StoreError),
    Pruned(Pruned),
    Done,
}
