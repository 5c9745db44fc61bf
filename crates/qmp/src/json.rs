//! QEMU-compatible JSON input and output.
//!
//! QEMU does not read QMP input with an ordinary JSON parser: a lexer turns the
//! byte stream into tokens, a "streamer" collects the tokens of one message by
//! counting braces and brackets, and a parser turns the collected tokens into a
//! value once the counts say the message is complete (or can never be). The
//! way it recovers from bad input follows from that design, and so do its error
//! texts. This module re-implements the same three stages (our own code, written
//! from QEMU's documented and observed behaviour) so that a client sees the same
//! replies from this server as from `qemu-storage-daemon`:
//!
//! * **Resynchronisation after bad input.** A lexical error (a byte that cannot
//!   continue the current token, e.g. a control character inside a string or
//!   `0xFF`) produces the error `JSON parse error, stray '...'`, throws away the
//!   tokens collected for the current message, and puts the lexer in recovery:
//!   it skips input up to the next structural character (`{ } [ ] : ,`), ASCII
//!   control character other than tab, or `0xFE`/`0xFF`, and starts afresh
//!   there. A grammar error (e.g. `{"a" 1}`) is only noticed once the brace and
//!   bracket counts balance (or go negative); the collected tokens are then
//!   discarded with one error reply. A client can therefore always regain sync
//!   by sending `0xFF` or a newline followed by a complete object, exactly as
//!   with QEMU.
//! * **Limits.** A message may hold at most 64 MiB of token text
//!   ([`MAX_MESSAGE_SIZE`]) and 2 Mi tokens; exceeding either yields
//!   [`Message::Fatal`] with QEMU's text (`JSON token size limit exceeded`,
//!   `JSON token count limit exceeded`). QEMU 10.0.2 itself crashes (segfault in
//!   glib) on a 65 MiB string, so there is no behaviour to copy beyond the text:
//!   the server replies with the error and closes the connection. Nesting deeper
//!   than 1024 (`JSON nesting depth limit exceeded`) is reported like QEMU does:
//!   the message is dropped and lexing continues, so the closing brackets of a
//!   deeply nested message produce further `expecting value` errors, one per
//!   bracket, just as QEMU's do.
//! * **No recursion.** The parser keeps its own stack, so no input can overflow
//!   the thread stack; values are at most 1025 levels deep.
//!
//! Output ([`to_json`]) uses QEMU's layout: `": "` and `", "` separators, and
//! strings with every character outside printable ASCII written as `\uXXXX`
//! (upper-case hex, surrogate pairs beyond the BMP).

use std::ops::ControlFlow;

use serde_json::{Map, Number, Value};

/// The largest message QEMU accepts: 64 MiB of token text.
pub const MAX_MESSAGE_SIZE: usize = 64 << 20;
/// The most tokens QEMU accepts in one message.
pub const MAX_TOKEN_COUNT: usize = 2 << 20;
/// The deepest nesting of objects and arrays QEMU accepts.
pub const MAX_NESTING: i64 = 1024;

/// `vsnprintf` into QEMU's 1024-byte buffer keeps at most this many bytes of a
/// parser error message.
const PARSE_ERROR_MAX: usize = 1023;

/// What [`JsonStreamer::feed`] found in the input.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A complete JSON value.
    Value(Value),
    /// Bad input, reported with this text (a QMP `GenericError`); parsing goes on.
    Error(String),
    /// A size limit was exceeded, reported with this text; the server closes the
    /// connection after replying.
    Fatal(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tok {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Comma,
    Colon,
    Integer,
    Float,
    Keyword,
    Str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LexState {
    Start,
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    Sign,
    Digits,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

/// Result of one lexer transition.
enum Step {
    /// Go to this (non-final) state.
    Go(LexState),
    /// A token ends here.
    Emit(Tok),
    /// Whitespace done / recovery done: back to the start state, token dropped.
    Restart,
    /// Lexical error.
    Error,
    /// Recovery skips this byte.
    Skip,
}

/// An incremental, QEMU-compatible JSON message reader (see the module docs).
#[derive(Debug)]
pub struct JsonStreamer {
    max_size: usize,
    state: LexState,
    token: Vec<u8>,
    brace: i64,
    bracket: i64,
    /// Collected tokens: kind and end offset of its text in `text`.
    toks: Vec<(Tok, u32)>,
    text: Vec<u8>,
}

impl Default for JsonStreamer {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonStreamer {
    /// A reader with QEMU's 64 MiB message limit.
    pub fn new() -> Self {
        Self::with_max_size(MAX_MESSAGE_SIZE)
    }

    /// A reader with a different message size limit (capped at 2 GiB).
    pub fn with_max_size(max_size: usize) -> Self {
        JsonStreamer {
            max_size: max_size.min(i32::MAX as usize),
            state: LexState::Start,
            token: Vec::new(),
            brace: 0,
            bracket: 0,
            toks: Vec::new(),
            text: Vec::new(),
        }
    }

    /// Feeds bytes; `sink` receives each message as soon as it is complete.
    /// Stops early (returning `Break`) when `sink` does, or right after a
    /// [`Message::Fatal`].
    pub fn feed(
        &mut self,
        data: &[u8],
        sink: &mut dyn FnMut(Message) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        for &ch in data {
            self.feed_byte(ch, sink)?;
        }
        ControlFlow::Continue(())
    }

    fn feed_byte(
        &mut self,
        ch: u8,
        sink: &mut dyn FnMut(Message) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        loop {
            let (step, consumed) = transition(self.state, ch);
            if consumed {
                self.token.push(ch);
            }
            match step {
                Step::Go(s) => self.state = s,
                Step::Emit(tok) => {
                    let token = std::mem::take(&mut self.token);
                    let flow = self.process_token(tok, &token, sink);
                    self.token = token;
                    self.token.clear();
                    if self.token.capacity() > 1 << 20 {
                        self.token.shrink_to(4096);
                    }
                    self.state = LexState::Start;
                    flow?;
                }
                Step::Restart => {
                    self.token.clear();
                    self.state = LexState::Start;
                }
                Step::Skip => {
                    self.token.clear();
                    self.state = LexState::Recovery;
                }
                Step::Error => {
                    let msg = format!("JSON parse error, stray '{}'", c_str_lossy(&self.token));
                    self.token.clear();
                    self.state = LexState::Recovery;
                    self.reset_message();
                    sink(Message::Error(msg))?;
                }
            }
            if consumed {
                break;
            }
        }
        if self.token.len() > self.max_size {
            // QEMU hands the oversized partial token to the streamer, whose
            // size check then fails.
            self.token = Vec::new();
            self.state = LexState::Start;
            self.reset_message();
            sink(Message::Fatal("JSON token size limit exceeded".into()))?;
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    fn reset_message(&mut self) {
        self.brace = 0;
        self.bracket = 0;
        self.toks.clear();
        self.text.clear();
        if self.text.capacity() > 1 << 20 {
            self.text.shrink_to(1 << 16);
            self.toks.shrink_to(1 << 12);
        }
    }

    fn process_token(
        &mut self,
        tok: Tok,
        token: &[u8],
        sink: &mut dyn FnMut(Message) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        match tok {
            Tok::LCurly => self.brace += 1,
            Tok::RCurly => self.brace -= 1,
            Tok::LSquare => self.bracket += 1,
            Tok::RSquare => self.bracket -= 1,
            _ => {}
        }
        if self.text.len() + token.len() + 1 > self.max_size {
            self.reset_message();
            sink(Message::Fatal("JSON token size limit exceeded".into()))?;
            return ControlFlow::Break(());
        }
        if self.toks.len() + 1 > MAX_TOKEN_COUNT {
            self.reset_message();
            sink(Message::Fatal("JSON token count limit exceeded".into()))?;
            return ControlFlow::Break(());
        }
        if self.bracket + self.brace > MAX_NESTING {
            self.reset_message();
            return sink(Message::Error("JSON nesting depth limit exceeded".into()));
        }
        self.text.extend_from_slice(token);
        // The size limit keeps offsets far below u32::MAX.
        self.toks.push((tok, self.text.len() as u32));
        if (self.brace > 0 || self.bracket > 0) && self.brace >= 0 && self.bracket >= 0 {
            return ControlFlow::Continue(());
        }
        let msg = match parse_tokens(&self.toks, &self.text) {
            Ok(v) => Message::Value(v),
            Err(e) => Message::Error(e),
        };
        self.reset_message();
        sink(msg)
    }
}

/// The lexer's transition table, as a function: the next step and whether
/// `ch` belongs to the current token (`false`: look-ahead, `ch` is fed again
/// from the start state).
fn transition(state: LexState, ch: u8) -> (Step, bool) {
    use LexState as S;
    match state {
        S::Start => match ch {
            b'"' => (Step::Go(S::DqString), true),
            b'\'' => (Step::Go(S::SqString), true),
            b'0' => (Step::Go(S::Zero), true),
            b'1'..=b'9' => (Step::Go(S::Digits), true),
            b'-' => (Step::Go(S::Sign), true),
            b'{' => (Step::Emit(Tok::LCurly), true),
            b'}' => (Step::Emit(Tok::RCurly), true),
            b'[' => (Step::Emit(Tok::LSquare), true),
            b']' => (Step::Emit(Tok::RSquare), true),
            b',' => (Step::Emit(Tok::Comma), true),
            b':' => (Step::Emit(Tok::Colon), true),
            b'a'..=b'z' => (Step::Go(S::Keyword), true),
            b' ' | b'\t' | b'\r' | b'\n' => (Step::Restart, true),
            _ => (Step::Error, true),
        },
        S::Recovery => match ch {
            b'\t' => (Step::Skip, true),
            0..=0x1f | 0xfe | 0xff | b'[' | b']' | b'{' | b'}' | b':' | b',' => {
                (Step::Restart, false)
            }
            _ => (Step::Skip, true),
        },
        S::DqString | S::SqString => {
            let (quote, escape) = if state == S::DqString {
                (b'"', S::DqEscape)
            } else {
                (b'\'', S::SqEscape)
            };
            match ch {
                b'\\' => (Step::Go(escape), true),
                c if c == quote => (Step::Emit(Tok::Str), true),
                0x20..=0xfd => (Step::Go(state), true),
                _ => (Step::Error, true),
            }
        }
        S::DqEscape | S::SqEscape => match ch {
            0x20..=0xfd => (
                Step::Go(if state == S::DqEscape {
                    S::DqString
                } else {
                    S::SqString
                }),
                true,
            ),
            _ => (Step::Error, true),
        },
        S::Zero => match ch {
            b'0'..=b'9' => (Step::Error, true),
            b'.' => (Step::Go(S::Mantissa), true),
            _ => (Step::Emit(Tok::Integer), false),
        },
        S::Sign => match ch {
            b'0' => (Step::Go(S::Zero), true),
            b'1'..=b'9' => (Step::Go(S::Digits), true),
            _ => (Step::Error, true),
        },
        S::Digits => match ch {
            b'0'..=b'9' => (Step::Go(S::Digits), true),
            b'e' | b'E' => (Step::Go(S::ExpE), true),
            b'.' => (Step::Go(S::Mantissa), true),
            _ => (Step::Emit(Tok::Integer), false),
        },
        S::Mantissa => match ch {
            b'0'..=b'9' => (Step::Go(S::MantissaDigits), true),
            _ => (Step::Error, true),
        },
        S::MantissaDigits => match ch {
            b'0'..=b'9' => (Step::Go(S::MantissaDigits), true),
            b'e' | b'E' => (Step::Go(S::ExpE), true),
            _ => (Step::Emit(Tok::Float), false),
        },
        S::ExpE => match ch {
            b'-' | b'+' => (Step::Go(S::ExpSign), true),
            b'0'..=b'9' => (Step::Go(S::ExpDigits), true),
            _ => (Step::Error, true),
        },
        S::ExpSign => match ch {
            b'0'..=b'9' => (Step::Go(S::ExpDigits), true),
            _ => (Step::Error, true),
        },
        S::ExpDigits => match ch {
            b'0'..=b'9' => (Step::Go(S::ExpDigits), true),
            _ => (Step::Emit(Tok::Float), false),
        },
        S::Keyword => match ch {
            b'a'..=b'z' => (Step::Go(S::Keyword), true),
            _ => (Step::Emit(Tok::Keyword), false),
        },
    }
}

/// QEMU prints C strings: text stops at the first NUL byte; invalid UTF-8 shows
/// as U+FFFD once the message is serialized.
fn c_str_lossy(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn parse_error(msg: String) -> String {
    let mut msg = msg;
    if msg.len() > PARSE_ERROR_MAX {
        let mut end = PARSE_ERROR_MAX;
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        msg.truncate(end);
    }
    format!("JSON parse error, {msg}")
}

/// One open container while parsing.
enum Frame {
    Array(Vec<Value>),
    /// An object waiting for a key.
    ObjectKey(Map<String, Value>),
    /// An object waiting for the value of `key`.
    ObjectValue(Map<String, Value>, String),
}

/// Parses one message's tokens the way QEMU's recursive-descent parser does
/// (same checks, same order, first error wins), without recursion.
fn parse_tokens(toks: &[(Tok, u32)], text: &[u8]) -> Result<Value, String> {
    const EOI: &str = "premature EOI";
    let mut pos = 0usize;
    let token_text = |i: usize| -> &[u8] {
        let start = if i == 0 { 0 } else { toks[i - 1].1 as usize };
        &text[start..toks[i].1 as usize]
    };
    let mut stack: Vec<Frame> = Vec::new();
    'value: loop {
        // Parse one value starting at `pos` (it may open a container).
        let Some(&(tok, _)) = toks.get(pos) else {
            return Err(parse_error(EOI.into()));
        };
        let mut value = match tok {
            Tok::LCurly | Tok::LSquare => {
                pos += 1;
                let close = if tok == Tok::LCurly {
                    Tok::RCurly
                } else {
                    Tok::RSquare
                };
                match toks.get(pos) {
                    None => return Err(parse_error(EOI.into())),
                    Some(&(t, _)) if t == close => {
                        pos += 1;
                        if tok == Tok::LCurly {
                            Value::Object(Map::new())
                        } else {
                            Value::Array(Vec::new())
                        }
                    }
                    Some(_) => {
                        stack.push(if tok == Tok::LCurly {
                            Frame::ObjectKey(Map::new())
                        } else {
                            Frame::Array(Vec::new())
                        });
                        continue 'value;
                    }
                }
            }
            Tok::Integer => {
                pos += 1;
                parse_integer(token_text(pos - 1))
            }
            Tok::Float => {
                pos += 1;
                parse_float(token_text(pos - 1))
            }
            Tok::Str => {
                pos += 1;
                Value::String(parse_string(token_text(pos - 1))?)
            }
            Tok::Keyword => {
                pos += 1;
                match token_text(pos - 1) {
                    b"true" => Value::Bool(true),
                    b"false" => Value::Bool(false),
                    b"null" => Value::Null,
                    kw => {
                        return Err(parse_error(format!(
                            "invalid keyword '{}'",
                            c_str_lossy(kw)
                        )))
                    }
                }
            }
            Tok::RCurly | Tok::RSquare | Tok::Comma | Tok::Colon => {
                return Err(parse_error("expecting value".into()))
            }
        };
        // Hand the finished value to the innermost open container; close
        // containers as their closing token arrives.
        loop {
            let Some(frame) = stack.pop() else {
                return Ok(value);
            };
            match frame {
                Frame::Array(mut items) => {
                    items.push(value);
                    let Some(&(t, _)) = toks.get(pos) else {
                        return Err(parse_error(EOI.into()));
                    };
                    pos += 1;
                    match t {
                        Tok::RSquare => value = Value::Array(items),
                        Tok::Comma => {
                            stack.push(Frame::Array(items));
                            continue 'value;
                        }
                        _ => return Err(parse_error("expected separator in list".into())),
                    }
                }
                Frame::ObjectKey(map) => {
                    let Value::String(key) = value else {
                        return Err(parse_error("key is not a string in object".into()));
                    };
                    let Some(&(t, _)) = toks.get(pos) else {
                        return Err(parse_error(EOI.into()));
                    };
                    pos += 1;
                    if t != Tok::Colon {
                        return Err(parse_error("missing : in object pair".into()));
                    }
                    stack.push(Frame::ObjectValue(map, key));
                    continue 'value;
                }
                Frame::ObjectValue(mut map, key) => {
                    if map.contains_key(&key) {
                        return Err(parse_error("duplicate key".into()));
                    }
                    map.insert(key, value);
                    let Some(&(t, _)) = toks.get(pos) else {
                        return Err(parse_error(EOI.into()));
                    };
                    pos += 1;
                    match t {
                        Tok::RCurly => value = Value::Object(map),
                        Tok::Comma => {
                            if pos >= toks.len() {
                                return Err(parse_error(EOI.into()));
                            }
                            stack.push(Frame::ObjectKey(map));
                            continue 'value;
                        }
                        _ => return Err(parse_error("expected separator in dict".into())),
                    }
                }
            }
        }
    }
}

/// QEMU keeps an integer as int64 if it fits, else uint64, else double.
fn parse_integer(text: &[u8]) -> Value {
    // The lexer only lets `-?[0-9]+` through, which is ASCII.
    let s = std::str::from_utf8(text).unwrap_or("0");
    if let Ok(v) = s.parse::<i64>() {
        return Value::Number(v.into());
    }
    if !s.starts_with('-') {
        if let Ok(v) = s.parse::<u64>() {
            return Value::Number(v.into());
        }
    }
    parse_float(text)
}

/// A double; one that overflows (QEMU: `inf`, which it then prints as the
/// invalid JSON token `inf`) is read as `null`.
fn parse_float(text: &[u8]) -> Value {
    let s = std::str::from_utf8(text).unwrap_or("0");
    s.parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// Whether QEMU accepts `cp` as a character (no surrogates, no noncharacters).
fn is_valid_codepoint(cp: i64) -> bool {
    !(!(0..=0x10ffff).contains(&cp)
        || (cp & 0xffff_f800) == 0xd800
        || (0xfdd0..=0xfdef).contains(&cp)
        || (cp & 0xfffe) == 0xfffe)
}

/// Four hex digits at `s[i..]`, or -1.
fn hex4(s: &[u8], i: usize) -> i64 {
    let mut cp = 0i64;
    for k in 0..4 {
        let Some(d) = s.get(i + k).and_then(|&b| (b as char).to_digit(16)) else {
            return -1;
        };
        cp = cp << 4 | i64::from(d);
    }
    cp
}

/// Decodes one modified-UTF-8 sequence at `s[i..]` (`C0 80` is U+0000; other
/// overlong forms, surrogates and noncharacters are invalid): the code point
/// and the index after it, or `None`.
fn utf8_codepoint(s: &[u8], i: usize) -> Option<(char, usize)> {
    let lead = s[i];
    if lead < 0x80 {
        return Some((char::from(lead), i + 1));
    }
    if lead >= 0xfe || lead & 0x40 == 0 {
        return None;
    }
    let len = lead.leading_ones() as usize;
    let mut cp = i64::from(lead & (0x7f >> len));
    for k in 1..len {
        let b = *s.get(i + k)?;
        if b & 0xc0 != 0x80 {
            return None;
        }
        cp = cp << 6 | i64::from(b & 0x3f);
    }
    const MIN: [i64; 5] = [0x80, 0x800, 0x10000, 0x20_0000, 0x400_0000];
    if !is_valid_codepoint(cp) || (cp < MIN[len - 2] && !(cp == 0 && len == 2)) {
        return None;
    }
    char::from_u32(cp as u32).map(|c| (c, i + len))
}

/// Decodes a string token (with its quotes) like QEMU's `parse_string`.
fn parse_string(tok: &[u8]) -> Result<String, String> {
    let quote = tok[0];
    let end = tok.len() - 1; // index of the closing quote
    let mut out = String::new();
    let mut i = 1;
    while i < end {
        match tok[i] {
            b'\\' => {
                let beg = i;
                i += 1;
                let esc = tok[i];
                i += 1;
                match esc {
                    b'"' => out.push('"'),
                    b'\'' => out.push('\''),
                    b'\\' => out.push('\\'),
                    b'/' => out.push('/'),
                    b'b' => out.push('\u{8}'),
                    b'f' => out.push('\u{c}'),
                    b'n' => out.push('\n'),
                    b'r' => out.push('\r'),
                    b't' => out.push('\t'),
                    b'u' => {
                        let mut cp = hex4(tok, i);
                        i += 4;
                        if (0xd800..=0xdbff).contains(&cp)
                            && tok.get(i) == Some(&b'\\')
                            && tok.get(i + 1) == Some(&b'u')
                        {
                            cp = 0x10000 + ((cp & 0x3ff) << 10);
                            let trailing = hex4(tok, i + 2);
                            if (0xdc00..=0xdfff).contains(&trailing) {
                                cp |= trailing & 0x3ff;
                                i += 6;
                            } else {
                                cp = -1;
                            }
                        }
                        match u32::try_from(cp).ok().filter(|_| is_valid_codepoint(cp)) {
                            Some(c) => out.push(char::from_u32(c).unwrap_or('\u{fffd}')),
                            None => {
                                let shown = &tok[beg..i.min(tok.len())];
                                return Err(parse_error(format!(
                                    "{} is not a valid Unicode character",
                                    c_str_lossy(shown)
                                )));
                            }
                        }
                    }
                    _ => return Err(parse_error("invalid escape sequence in string".into())),
                }
            }
            _ => match utf8_codepoint(&tok[..end], i) {
                Some((c, next)) => {
                    out.push(c);
                    i = next;
                }
                None => return Err(parse_error("invalid UTF-8 sequence in string".into())),
            },
        }
    }
    debug_assert_eq!(tok[end], quote);
    Ok(out)
}

/// Serializes `v` the way QEMU does (see the module docs).
pub fn to_json(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v);
    out
}

/// Appends `v` in QEMU's layout to `out`.
pub fn write_value(out: &mut String, v: &Value) {
    // Explicit stack: handler results may be arbitrarily deep.
    enum Item<'a> {
        Value(&'a Value),
        Raw(&'static str),
        Key(&'a str),
    }
    let mut work = vec![Item::Value(v)];
    while let Some(item) = work.pop() {
        match item {
            Item::Raw(s) => out.push_str(s),
            Item::Key(k) => {
                write_str(out, k);
                out.push_str(": ");
            }
            Item::Value(v) => match v {
                Value::Null => out.push_str("null"),
                Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
                Value::Number(n) => out.push_str(&n.to_string()),
                Value::String(s) => write_str(out, s),
                Value::Array(items) if items.is_empty() => out.push_str("[]"),
                Value::Object(map) if map.is_empty() => out.push_str("{}"),
                Value::Array(items) => {
                    out.push('[');
                    work.push(Item::Raw("]"));
                    for (i, item) in items.iter().enumerate().rev() {
                        work.push(Item::Value(item));
                        if i > 0 {
                            work.push(Item::Raw(", "));
                        }
                    }
                }
                Value::Object(map) => {
                    out.push('{');
                    work.push(Item::Raw("}"));
                    let entries: Vec<_> = map.iter().collect();
                    for (i, (k, v)) in entries.into_iter().enumerate().rev() {
                        work.push(Item::Value(v));
                        work.push(Item::Key(k));
                        if i > 0 {
                            work.push(Item::Raw(", "));
                        }
                    }
                }
            },
        }
    }
}

/// Appends a JSON string with QEMU's escaping.
pub fn write_str(out: &mut String, s: &str) {
    use std::fmt::Write;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut cp = u32::from(c);
                if !is_valid_codepoint(i64::from(cp)) {
                    cp = 0xfffd;
                }
                if cp > 0xffff {
                    let v = cp - 0x10000;
                    let _ = write!(
                        out,
                        "\\u{:04X}\\u{:04X}",
                        0xd800 + (v >> 10),
                        0xdc00 + (v & 0x3ff)
                    );
                } else {
                    let _ = write!(out, "\\u{cp:04X}");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(input: &[u8]) -> Vec<Message> {
        let mut s = JsonStreamer::new();
        let mut out = Vec::new();
        let _ = s.feed(input, &mut |m| {
            out.push(m);
            ControlFlow::Continue(())
        });
        out
    }

    fn err(s: &str) -> Message {
        Message::Error(s.to_string())
    }

    #[test]
    fn values_split_anywhere() {
        let input = br#"{"execute":"x","id":[1,-2,3.5,"a\u00e9\ud83d\ude00",true,false,null,{}]}"#;
        let want = json!({"execute":"x","id":[1,-2,3.5,"a\u{e9}\u{1f600}",true,false,null,{}]});
        assert_eq!(run(input), vec![Message::Value(want.clone())]);
        for split in 0..input.len() {
            let mut s = JsonStreamer::new();
            let mut out = Vec::new();
            for part in [&input[..split], &input[split..]] {
                let _ = s.feed(part, &mut |m| {
                    out.push(m);
                    ControlFlow::Continue(())
                });
            }
            assert_eq!(out, vec![Message::Value(want.clone())], "split at {split}");
        }
    }

    #[test]
    fn top_level_number_needs_a_delimiter() {
        assert_eq!(run(b"42"), vec![]);
        assert_eq!(run(b"42 "), vec![Message::Value(json!(42))]);
    }

    #[test]
    fn qemu_extensions_and_numbers() {
        assert_eq!(
            run(b"{'a':'b\\'c\"'}"),
            vec![Message::Value(json!({"a": "b'c\""}))]
        );
        assert_eq!(
            run(b"[12345678901234567890,-0,1E2,1e400,\"\xc0\x80\"]"),
            vec![Message::Value(json!([
                12345678901234567890u64,
                0,
                100.0,
                null,
                "\0"
            ]))]
        );
    }

    // Expected texts below were produced by qemu-storage-daemon 10.0.2.
    #[test]
    fn qemu_error_texts() {
        let cases: &[(&[u8], &[&str])] = &[
            (b"{bad}", &["JSON parse error, invalid keyword 'bad'"]),
            (
                b"{\"a\": \"b\" ] ",
                &["JSON parse error, expected separator in dict"],
            ),
            (b"\xff{}", &["JSON parse error, stray '\u{fffd}'", ""]),
            (
                b"{\"id\":\"a\x01b\"}",
                &[
                    "JSON parse error, stray '\"a\u{1}'",
                    "JSON parse error, expecting value",
                ],
            ),
            (b"}", &["JSON parse error, expecting value"]),
            (br#"{"id":7,"id":8}"#, &["JSON parse error, duplicate key"]),
            (
                b"{\"id\":\"\xc3\"}",
                &["JSON parse error, invalid UTF-8 sequence in string"],
            ),
            (
                b"{\"id\":\"\xef\xbf\xbf\"}",
                &["JSON parse error, invalid UTF-8 sequence in string"],
            ),
            (
                b"{\"id\":\"\xe0\x80\x80\"}",
                &["JSON parse error, invalid UTF-8 sequence in string"],
            ),
            (
                b"{\"id\":\"\xed\xa0\x80\"}",
                &["JSON parse error, invalid UTF-8 sequence in string"],
            ),
            (
                br#"{"id":"\ud800"}"#,
                &["JSON parse error, \\ud800 is not a valid Unicode character"],
            ),
            (
                br#"{"id":"\ud83dx"}"#,
                &["JSON parse error, \\ud83d is not a valid Unicode character"],
            ),
            (
                br#"{"id":"\uFFFF"}"#,
                &["JSON parse error, \\uFFFF is not a valid Unicode character"],
            ),
            (
                br#"{"id":"\u00"}"#,
                &["JSON parse error, \\u00\" is not a valid Unicode character"],
            ),
            (
                br#"{"id":"\uZZZZ"}"#,
                &["JSON parse error, \\uZZZZ is not a valid Unicode character"],
            ),
            (
                br#"{"id":"\x"}"#,
                &["JSON parse error, invalid escape sequence in string"],
            ),
            (b"01 ", &["JSON parse error, stray '01'"]),
            (b"-a {}", &["JSON parse error, stray '-a'", ""]),
            (b"%d ", &["JSON parse error, stray '%'"]),
            (b"{\"id\":1.}", &["JSON parse error, stray '1.}'"]),
            (
                b"{\"a\" \"b\", \"c\": 1}",
                &["JSON parse error, missing : in object pair"],
            ),
            (b"{\"a\":}", &["JSON parse error, expecting value"]),
            (b"[}", &["JSON parse error, expecting value"]),
            (
                b"{1:2}",
                &["JSON parse error, key is not a string in object"],
            ),
            (b"[1,2,]", &["JSON parse error, expecting value"]),
            (b"[1 2]", &["JSON parse error, expected separator in list"]),
            (
                b"{\"id\":\"\xfe\"}",
                &[
                    "JSON parse error, stray '\"\u{fffd}'",
                    "JSON parse error, expecting value",
                ],
            ),
        ];
        for (input, want) in cases {
            let got: Vec<String> = run(input)
                .into_iter()
                .map(|m| match m {
                    Message::Error(e) => e,
                    Message::Value(v) => {
                        assert_eq!(v, json!({}));
                        String::new()
                    }
                    Message::Fatal(e) => panic!("fatal {e}"),
                })
                .collect();
            assert_eq!(&got, want, "input {:?}", String::from_utf8_lossy(input));
        }
    }

    /// Recovery after a lexical error resumes at `:` and `,` too (texts from
    /// qemu-storage-daemon 10.0.2; `Value` stands for a parsed value).
    #[test]
    fn recovery_resumes_at_structural_characters() {
        let show = |input: &[u8]| -> Vec<String> {
            run(input)
                .into_iter()
                .map(|m| match m {
                    Message::Error(e) => e,
                    Message::Value(_) => "Value".into(),
                    Message::Fatal(e) => panic!("fatal {e}"),
                })
                .collect()
        };
        let expecting = "JSON parse error, expecting value";
        assert_eq!(
            show(b"{\"execute\":\"x\",\"id\":\"a\x01b\",\"x\":1}"),
            [
                "JSON parse error, stray '\"a\u{1}'",
                expecting,
                "Value",
                expecting,
                "Value",
                expecting
            ]
        );
        assert_eq!(
            show(b"\xff a:b,c {}"),
            [
                "JSON parse error, stray '\u{fffd}'",
                expecting,
                "JSON parse error, invalid keyword 'b'",
                expecting,
                "JSON parse error, invalid keyword 'c'",
                "Value"
            ]
        );
    }

    #[test]
    fn keyword_message_is_truncated_like_vsnprintf() {
        let mut input = vec![b'x'; 5000];
        input.push(b' ');
        let out = run(&input);
        let [Message::Error(e)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(e.len(), "JSON parse error, ".len() + 1023);
        assert!(e.starts_with("JSON parse error, invalid keyword 'xxx"));
    }

    #[test]
    fn nesting_limit_and_recovery() {
        let mut input = vec![b'['; 1024];
        input.extend(vec![b']'; 1024]);
        assert_eq!(run(&input).len(), 1, "1024 levels are fine");
        let mut input = vec![b'['; 1025];
        input.extend(vec![b']'; 1025]);
        let out = run(&input);
        assert_eq!(out[0], err("JSON nesting depth limit exceeded"));
        assert_eq!(out.len(), 1 + 1025);
        assert!(out[1..]
            .iter()
            .all(|m| *m == err("JSON parse error, expecting value")));
    }

    #[test]
    fn deep_nesting_counts_match_qemu() {
        // qemu-storage-daemon 10.0.2 answers this input with 97 nesting
        // errors, 1 "must be a JSON object" and 99425 "expecting value".
        let mut input = vec![b'['; 100_000];
        input.extend(vec![b']'; 100_000]);
        let out = run(&input);
        let depth = out
            .iter()
            .filter(|m| **m == err("JSON nesting depth limit exceeded"))
            .count();
        let values = out
            .iter()
            .filter(|m| matches!(m, Message::Value(_)))
            .count();
        let expecting = out
            .iter()
            .filter(|m| **m == err("JSON parse error, expecting value"))
            .count();
        assert_eq!((depth, values, expecting), (97, 1, 99425));
    }

    #[test]
    fn size_limits_are_fatal() {
        let mut s = JsonStreamer::with_max_size(1000);
        let mut out = Vec::new();
        let mut input = b"{\"a\":\"".to_vec();
        input.extend(vec![b'x'; 2000]);
        let flow = s.feed(&input, &mut |m| {
            out.push(m);
            ControlFlow::Continue(())
        });
        assert!(flow.is_break());
        assert_eq!(
            out,
            vec![Message::Fatal("JSON token size limit exceeded".into())]
        );

        // Many small tokens adding up.
        let mut s = JsonStreamer::with_max_size(1000);
        let mut out = Vec::new();
        let input = format!("[{}1]", "1,".repeat(600));
        let _ = s.feed(input.as_bytes(), &mut |m| {
            out.push(m);
            ControlFlow::Break(())
        });
        assert_eq!(
            out,
            vec![Message::Fatal("JSON token size limit exceeded".into())]
        );
    }

    #[test]
    fn output_format_matches_qemu() {
        let v = json!({"return": {}, "id": [1, "\u{e9}\u{1f600}\u{0}\u{7f}\"\\\n/", {"a": []}]});
        assert_eq!(
            to_json(&v),
            r#"{"id": [1, "\u00E9\uD83D\uDE00\u0000\u007F\"\\\n/", {"a": []}], "return": {}}"#
        );
    }

    #[test]
    fn deep_output_does_not_recurse() {
        let mut v = json!(1);
        for _ in 0..200_000 {
            v = Value::Array(vec![v]);
        }
        let s = to_json(&v);
        assert_eq!(s.len(), 400_001);
        // Dropping a deep Value recurses in serde_json; unwind it by hand.
        while let Value::Array(mut items) = v {
            v = items.pop().unwrap_or(Value::Null);
        }
    }
}
