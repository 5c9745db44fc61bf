//! A QMP server with a few toy commands, for trying clients by hand:
//!
//! ```text
//! cargo run --release -p qmp --example fake_server -- /tmp/fake.sock &
//! qmp-shell /tmp/fake.sock
//! (QEMU) echo a=1
//! (QEMU) tick name=HELLO
//! (QEMU) quit
//! ```

use std::sync::OnceLock;

use qmp::{ArgsExt, CommandHandler, Emitter, QmpError, Server, Version};
use serde_json::{json, Map, Value};

#[derive(Default)]
struct Toy {
    emitter: OnceLock<Emitter>,
}

impl CommandHandler for Toy {
    fn execute(&self, name: &str, args: Map<String, Value>) -> Result<Value, QmpError> {
        match name {
            "echo" => Ok(Value::Object(args)),
            "fail" => {
                let desc = args.opt_str("desc")?.unwrap_or("failed as asked");
                args.reject_unexpected(&["desc"])?;
                Err(QmpError::generic(desc))
            }
            "tick" => {
                let event = args.req_str("name")?;
                args.reject_unexpected(&["name"])?;
                if let Some(e) = self.emitter.get() {
                    e.emit(event, json!({"source": "tick"}));
                }
                Ok(json!({}))
            }
            "quit" => Ok(json!({})),
            _ => Err(QmpError::command_not_found(format!(
                "The command {name} has not been found"
            ))),
        }
    }

    fn commands(&self) -> Vec<String> {
        ["echo", "fail", "tick", "quit"].map(String::from).to_vec()
    }

    fn version(&self) -> Version {
        Version::new(10, 0, 2, "qmp fake_server example")
    }

    fn stop_after(&self, name: &str) -> bool {
        name == "quit"
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: fake_server SOCKET_PATH")?;
    let toy = std::sync::Arc::new(Toy::default());
    let server = Server::from_arc(toy.clone()).bind(&path)?;
    let _ = toy.emitter.set(server.emitter());
    eprintln!("listening on {path}; `quit` stops");
    server.wait();
    Ok(())
}
