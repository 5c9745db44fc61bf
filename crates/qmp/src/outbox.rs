//! A client's bounded queue of outgoing lines, drained by its writer thread.
//!
//! Replies wait for room (the client's own requests are throttled when it
//! does not read its replies, like QEMU suspends reading a monitor with
//! pending output); events never wait: when they do not fit, the client is
//! disconnected, so a client that stops reading cannot hold up the others or
//! the code emitting events.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One line to send.
pub(crate) type Line = Arc<[u8]>;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The queue is closed (connection ending).
    Closed,
    /// An event did not fit.
    Full,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Line>,
    bytes: usize,
    closed: bool,
    /// Stopping: replies no longer wait for room.
    finishing: bool,
    writer_done: bool,
}

#[derive(Debug)]
pub(crate) struct Outbox {
    limit: usize,
    state: Mutex<State>,
    cv: Condvar,
}

impl Outbox {
    pub fn new(limit: usize) -> Self {
        Outbox {
            limit: limit.max(1),
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a reply, waiting while the queue is over its limit (a line
    /// always fits into an empty queue).
    pub fn push_reply(&self, line: Line) -> Result<(), PushError> {
        let mut st = self.lock();
        while !st.closed && !st.finishing && st.bytes > 0 && st.bytes + line.len() > self.limit {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.closed {
            return Err(PushError::Closed);
        }
        st.bytes += line.len();
        st.queue.push_back(line);
        self.cv.notify_all();
        Ok(())
    }

    /// Queues an event if it fits.
    pub fn push_event(&self, line: Line) -> Result<(), PushError> {
        let mut st = self.lock();
        if st.closed {
            return Err(PushError::Closed);
        }
        if st.bytes > 0 && st.bytes + line.len() > self.limit {
            return Err(PushError::Full);
        }
        st.bytes += line.len();
        st.queue.push_back(line);
        self.cv.notify_all();
        Ok(())
    }

    /// The next line for the writer; `None` once closed and drained.
    pub fn pop(&self) -> Option<Line> {
        let mut st = self.lock();
        loop {
            if let Some(line) = st.queue.pop_front() {
                st.bytes -= line.len();
                self.cv.notify_all();
                return Some(line);
            }
            if st.closed {
                return None;
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The server is stopping: a reply being produced is queued without
    /// waiting for room, so the thread producing it can finish.
    pub fn finish(&self) {
        self.lock().finishing = true;
        self.cv.notify_all();
    }

    /// No more lines; what is queued is still written.
    pub fn close(&self) {
        self.lock().closed = true;
        self.cv.notify_all();
    }

    /// No more lines, and drop what is queued.
    pub fn abort(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.queue.clear();
        st.bytes = 0;
        self.cv.notify_all();
    }

    /// Called by the writer thread when it exits.
    pub fn writer_done(&self) {
        let mut st = self.lock();
        st.writer_done = true;
        st.closed = true;
        st.queue.clear();
        st.bytes = 0;
        self.cv.notify_all();
    }

    /// Waits up to `timeout` for the writer thread to finish.
    pub fn wait_writer_done(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while !st.writer_done {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Bytes queued.
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: usize) -> Line {
        vec![b'x'; n].into()
    }

    #[test]
    fn limits() {
        let o = Outbox::new(10);
        o.push_event(line(20)).unwrap(); // fits into an empty queue
        assert_eq!(o.push_event(line(1)), Err(PushError::Full));
        assert_eq!(o.pop().unwrap().len(), 20);
        o.push_event(line(6)).unwrap();
        o.push_event(line(4)).unwrap();
        assert_eq!(o.queued(), 10);
        let o = Arc::new(o);
        let o2 = o.clone();
        let t = std::thread::spawn(move || o2.push_reply(line(5)));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "reply waits for room");
        o.pop();
        t.join().unwrap().unwrap();
        o.close();
        assert_eq!(o.push_reply(line(1)), Err(PushError::Closed));
        assert_eq!(o.pop().unwrap().len(), 4);
        assert_eq!(o.pop().unwrap().len(), 5);
        assert!(o.pop().is_none());
    }
}
