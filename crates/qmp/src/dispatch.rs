//! From a parsed message to a reply, the way QEMU's `qmp_dispatch()` and
//! monitor do it (checks, order and texts).

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::json::{write_str, write_value, Message};
use crate::{ArgsExt, CommandHandler, QmpError};

const BUILTINS: [&str; 3] = ["qmp_capabilities", "query-commands", "query-version"];

/// Shared by all connections of a server.
pub(crate) struct Dispatcher {
    handler: Arc<dyn CommandHandler>,
    /// Handler commands (minus built-ins), in the order given.
    commands: Vec<String>,
    known: HashSet<String>,
}

/// Per-connection state.
#[derive(Debug, Default)]
pub(crate) struct Session {
    /// `qmp_capabilities` succeeded.
    pub negotiated: bool,
}

/// What to do after a message.
pub(crate) struct Outcome {
    /// The reply line, `\r\n`-terminated.
    pub reply: String,
    /// The handler asked for the server to stop after this reply.
    pub stop: bool,
}

impl Dispatcher {
    pub fn new(handler: Arc<dyn CommandHandler>) -> Self {
        let mut known = HashSet::new();
        let commands: Vec<String> = handler
            .commands()
            .into_iter()
            .filter(|c| !BUILTINS.contains(&c.as_str()) && known.insert(c.clone()))
            .collect();
        Dispatcher {
            handler,
            commands,
            known,
        }
    }

    /// The greeting line.
    pub fn greeting(&self) -> String {
        let mut out = String::from("{\"QMP\": {\"version\": ");
        write_value(&mut out, &self.handler.version().to_json());
        out.push_str(", \"capabilities\": []}}\r\n");
        out
    }

    /// Handles one message from the JSON streamer.
    pub fn handle(&self, session: &mut Session, msg: Message) -> Outcome {
        let req = match msg {
            Message::Value(v) => v,
            Message::Error(e) | Message::Fatal(e) => {
                return Outcome {
                    reply: error_reply(&QmpError::generic(e), None),
                    stop: false,
                }
            }
        };
        let Value::Object(mut req) = req else {
            return Outcome {
                reply: error_reply(&QmpError::generic("QMP input must be a JSON object"), None),
                stop: false,
            };
        };
        let id = req.remove("id");
        let mut stop = false;
        let result = self.dispatch(session, req, &mut stop);
        let reply = match result {
            // QEMU answers a command without a result with `{}`.
            Ok(Value::Null) => ok_reply(&json!({}), id.as_ref()),
            Ok(ret) => ok_reply(&ret, id.as_ref()),
            Err(e) => {
                stop = false;
                error_reply(&e, id.as_ref())
            }
        };
        Outcome { reply, stop }
    }

    fn dispatch(
        &self,
        session: &mut Session,
        mut req: Map<String, Value>,
        stop: &mut bool,
    ) -> Result<Value, QmpError> {
        // qmp_dispatch_check_obj(); "exec-oob" is unexpected as we offer no
        // out-of-band capability.
        for (key, value) in &req {
            match key.as_str() {
                "execute" if !value.is_string() => {
                    return Err(QmpError::generic(
                        "QMP input member 'execute' must be a string",
                    ))
                }
                "arguments" if !value.is_object() => {
                    return Err(QmpError::generic(
                        "QMP input member 'arguments' must be an object",
                    ))
                }
                "execute" | "arguments" => {}
                _ => {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{key}' is unexpected"
                    )))
                }
            }
        }
        let Some(Value::String(name)) = req.remove("execute") else {
            return Err(QmpError::generic("QMP input lacks member 'execute'"));
        };
        let args = match req.remove("arguments") {
            Some(Value::Object(args)) => args,
            _ => Map::new(),
        };
        if !session.negotiated {
            // Only qmp_capabilities exists before negotiation; QEMU rewrites
            // the CommandNotFound text.
            if name != "qmp_capabilities" {
                return Err(QmpError::command_not_found(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ));
            }
        }
        match name.as_str() {
            "qmp_capabilities" => self.qmp_capabilities(session, &args),
            "query-commands" => {
                args.reject_unexpected(&[])?;
                let list: Vec<Value> = self
                    .commands
                    .iter()
                    .map(String::as_str)
                    .chain(BUILTINS)
                    .map(|c| json!({"name": c}))
                    .collect();
                Ok(Value::Array(list))
            }
            "query-version" => {
                args.reject_unexpected(&[])?;
                Ok(self.handler.version().to_json())
            }
            _ if self.known.contains(&name) => {
                let handler = &self.handler;
                let result = catch_unwind(AssertUnwindSafe(|| handler.execute(&name, args)))
                    .unwrap_or_else(|_| {
                        log::error!("QMP command {name} panicked");
                        Err(QmpError::generic(format!(
                            "Internal error while executing {name}"
                        )))
                    });
                if result.is_ok() {
                    *stop = handler.stop_after(&name);
                }
                result
            }
            _ => Err(QmpError::command_not_found(format!(
                "The command {name} has not been found"
            ))),
        }
    }

    fn qmp_capabilities(
        &self,
        session: &mut Session,
        args: &Map<String, Value>,
    ) -> Result<Value, QmpError> {
        // Argument visit first (as QEMU's marshaller), then the command.
        let mut unavailable = Vec::new();
        if let Some(list) = args.opt_array("enable")? {
            for item in list.iter() {
                let cap = item.as_str()?;
                // The enum visitor of a list element has no name: QEMU says
                // 'null'.
                if cap != "oob" {
                    return Err(QmpError::invalid_enum_value("null", cap));
                }
                unavailable.push(cap);
            }
        }
        args.reject_unexpected(&["enable"])?;
        if session.negotiated {
            return Err(QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        if !unavailable.is_empty() {
            return Err(QmpError::generic(format!(
                "Capability {} not available",
                unavailable.join(", ")
            )));
        }
        session.negotiated = true;
        Ok(json!({}))
    }
}

/// `{"return": RET, "id": ID}`.
pub(crate) fn ok_reply(ret: &Value, id: Option<&Value>) -> String {
    let mut out = String::from("{\"return\": ");
    write_value(&mut out, ret);
    finish(out, id)
}

/// `{"error": {"class": ..., "desc": ...}, "id": ID}`.
pub(crate) fn error_reply(e: &QmpError, id: Option<&Value>) -> String {
    let mut out = String::from("{\"error\": {\"class\": ");
    write_str(&mut out, e.class.as_str());
    out.push_str(", \"desc\": ");
    write_str(&mut out, &e.desc);
    out.push('}');
    finish(out, id)
}

fn finish(mut out: String, id: Option<&Value>) -> String {
    if let Some(id) = id {
        out.push_str(", \"id\": ");
        write_value(&mut out, id);
    }
    out.push_str("}\r\n");
    out
}

/// `{"timestamp": {"seconds": S, "microseconds": US}, "event": NAME, "data": DATA}`
/// (no `data` member when `data` is null, as QEMU does for events without data).
pub(crate) fn event_line(event: &str, data: &Value) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut out = format!(
        "{{\"timestamp\": {{\"seconds\": {}, \"microseconds\": {}}}, \"event\": ",
        now.as_secs(),
        now.subsec_micros()
    );
    write_str(&mut out, event);
    if !data.is_null() {
        out.push_str(", \"data\": ");
        write_value(&mut out, data);
    }
    out.push_str("}\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Version;

    struct H;
    impl CommandHandler for H {
        fn execute(&self, name: &str, _args: Map<String, Value>) -> Result<Value, QmpError> {
            match name {
                "boom" => panic!("boom"),
                _ => Ok(json!({"ran": name})),
            }
        }
        fn commands(&self) -> Vec<String> {
            vec![
                "x".into(),
                "boom".into(),
                "query-version".into(),
                "x".into(),
            ]
        }
        fn version(&self) -> Version {
            Version::new(1, 2, 3, "pkg")
        }
    }

    fn run(d: &Dispatcher, s: &mut Session, req: Value) -> String {
        d.handle(s, Message::Value(req)).reply
    }

    #[test]
    fn negotiation_and_dispatch() {
        let d = Dispatcher::new(Arc::new(H));
        let s = &mut Session::default();
        assert_eq!(
            d.greeting(),
            "{\"QMP\": {\"version\": {\"package\": \"pkg\", \"qemu\": {\"major\": 1, \"micro\": 3, \"minor\": 2}}, \"capabilities\": []}}\r\n"
        );
        assert_eq!(
            run(&d, s, json!({"execute": "x", "id": 1})),
            "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Expecting capabilities negotiation with 'qmp_capabilities'\"}, \"id\": 1}\r\n"
        );
        assert_eq!(
            run(&d, s, json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})),
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Capability oob not available\"}}\r\n"
        );
        assert_eq!(
            run(&d, s, json!({"execute": "qmp_capabilities"})),
            "{\"return\": {}}\r\n"
        );
        assert_eq!(
            run(&d, s, json!({"execute": "x", "id": {"a": [1]}})),
            "{\"return\": {\"ran\": \"x\"}, \"id\": {\"a\": [1]}}\r\n"
        );
        assert!(
            run(&d, s, json!({"execute": "boom"})).contains("Internal error while executing boom")
        );
        assert_eq!(
            run(&d, s, json!({"execute": "query-commands"})),
            "{\"return\": [{\"name\": \"x\"}, {\"name\": \"boom\"}, {\"name\": \"qmp_capabilities\"}, {\"name\": \"query-commands\"}, {\"name\": \"query-version\"}]}\r\n"
        );
    }

    #[test]
    fn event_format() {
        let l = event_line("E", &json!({"a": 1}));
        let v: Value = serde_json::from_str(&l).unwrap();
        assert!(v["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(v["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
        assert!(l.contains("\"event\": \"E\", \"data\": {\"a\": 1}}\r\n"));
        assert!(!event_line("E", &Value::Null).contains("data"));
    }
}
