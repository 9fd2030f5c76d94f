//! A minimal reader of a `text/event-stream` body that also reports blocks without data (an
//! `id:` line alone) and the end of the stream.

use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};

/// One SSE block that carries an id or data (comments and `retry:` alone are skipped).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Block {
    pub id: Option<u64>,
    pub event: Option<String>,
    pub data: Option<String>,
}

#[derive(Debug, PartialEq)]
pub enum Next {
    Block(Block),
    /// The server ended the stream.
    Ended,
    /// Nothing arrived within the wait.
    Quiet,
}

pub struct SseReader {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
        }
    }

    pub async fn next(&mut self, wait: Duration) -> Next {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let text: String = self.buffer.drain(..end + 2).collect();
                let mut block = Block::default();
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        block.id = v.parse().ok();
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        block.event = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        block.data = Some(v.to_owned());
                    }
                }
                if block.id.is_some() || block.data.is_some() {
                    return Next::Block(block);
                }
                continue;
            }
            match tokio::time::timeout(wait, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Some(Err(_)) | None) => return Next::Ended,
                Err(_) => return Next::Quiet,
            }
        }
    }
}
