//! An NBD (network block device) server library.
//!
//! It serves any number of named [`Export`]s (a trait: size, read, write, write-zeroes,
//! trim, flush and block status per meta context) over unix and TCP sockets, speaking the
//! fixed newstyle handshake with `NBD_OPT_GO`/`NBD_OPT_INFO`, structured replies and the
//! meta contexts `base:allocation`, `qemu:allocation-depth` and `qemu:dirty-bitmap:NAME`
//! the way QEMU's server does, so QEMU (`qemu-img`, `qemu-io`), libnbd (`nbdinfo`,
//! `nbdcopy`, `nbdsh`, Python) and oVirt imageio work with it. It knows nothing of the
//! storage behind an export.
//!
//! ```no_run
//! use std::sync::Arc;
//! # fn demo(disk: Arc<dyn nbd::Export>) -> Result<(), nbd::NbdError> {
//! let server = nbd::Server::new(nbd::ServerOptions::default());
//! server.add_export("disk0", disk)?;
//! server.serve_unix(std::os::unix::net::UnixListener::bind("/tmp/nbd.sock")?)?;
//! // … later
//! server.remove_export("disk0", nbd::RemoveMode::Hard)?;
//! server.shutdown();
//! # Ok(()) }
//! ```
//!
//! Threads: one per listener, one per connection (handshake, then it reads requests) and
//! up to [`ServerOptions::workers_per_client`] workers per connection that run requests
//! concurrently. Replies are written with `send(MSG_NOSIGNAL)`, so a client that goes away
//! never raises SIGPIPE.

pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod proto;

mod error;
mod handshake;
mod meta;
mod server;
mod session;
mod socket;
mod transmission;

use std::io::{Read, Write};

pub use error::NbdError;
pub use export::*;
pub use server::{RemoveMode, Server, ServerOptions, HANDSHAKE_TIMEOUT};

/// Runs one client session over `stream` (handshake, then transmission) until the client
/// disconnects, the stream ends or the client breaks the protocol. Requests are served
/// one at a time on the calling thread; the session is not counted in
/// [`ServerOptions::max_clients`] and [`Server::shutdown`] cannot interrupt it. Meant for
/// tests and fuzzing (e.g. over an in-memory stream).
///
/// `Ok(())` after `NBD_OPT_ABORT`, `NBD_CMD_DISC` or EOF between messages.
pub fn serve_stream<S: Read + Write>(server: &Server, stream: S) -> Result<(), NbdError> {
    let mut stream = stream;
    match handshake::negotiate(&mut stream, server.shared(), None) {
        Ok(handshake::Outcome::Aborted) => Ok(()),
        Ok(handshake::Outcome::Transmission(n)) => {
            let session = transmission::Session::new(n);
            session::run_inline(&mut stream, &session)
        }
        Err(e) => Err(e),
    }
}
