//! Unit tests of the request path over a mock virtqueue.

mod backend;
mod common;
mod requests;
mod snapshot;
