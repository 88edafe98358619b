//! A small JSON reader that keeps each value's line and column, for policy
//! errors that point at the offending text. HuJSON's additions are
//! accepted: `//` and `/* */` comments and trailing commas.
//!
//! Bounded: nesting deeper than [`MAX_DEPTH`] is an error (no recursion
//! blow-up on hostile input); the caller bounds the input size.

use std::fmt;

/// Deepest nesting of arrays and objects accepted.
pub const MAX_DEPTH: usize = 32;

/// Line and column (both from 1, the column in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: u32,
    pub column: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    /// The number as written (policies use none; kept for error text).
    Number(String),
    Str(String),
    Array(Vec<Value>),
    /// Keys in order, each with its own position.
    Object(Vec<(String, Pos, Value)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    pub pos: Pos,
    pub json: Json,
}

impl Value {
    /// What the value is, for "expected X, found Y" errors.
    pub fn kind(&self) -> &'static str {
        match self.json {
            Json::Null => "null",
            Json::Bool(_) => "a boolean",
            Json::Number(_) => "a number",
            Json::Str(_) => "a string",
            Json::Array(_) => "an array",
            Json::Object(_) => "an object",
        }
    }
}

/// A syntax error at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

struct Reader<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    pos: Pos,
}

pub fn parse(text: &str) -> Result<Value, SyntaxError> {
    let mut r = Reader {
        chars: text.chars().peekable(),
        pos: Pos { line: 1, column: 1 },
    };
    r.skip_space()?;
    let v = r.value(0)?;
    r.skip_space()?;
    if r.chars.peek().is_some() {
        return Err(r.error("unexpected text after the end of the document"));
    }
    Ok(v)
}

impl Reader<'_> {
    fn error(&self, message: impl Into<String>) -> SyntaxError {
        SyntaxError {
            pos: self.pos,
            message: message.into(),
        }
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.pos.line += 1;
            self.pos.column = 1;
        } else {
            self.pos.column += 1;
        }
        Some(c)
    }

    fn skip_space(&mut self) -> Result<(), SyntaxError> {
        loop {
            match self.chars.peek() {
                Some(' ' | '\t' | '\n' | '\r' | '\u{feff}') => {
                    self.bump();
                }
                Some('/') => {
                    let at = self.pos;
                    self.bump();
                    match self.bump() {
                        Some('/') => while self.bump().is_some_and(|c| c != '\n') {},
                        Some('*') => {
                            let mut star = false;
                            loop {
                                match self.bump() {
                                    None => {
                                        return Err(SyntaxError {
                                            pos: at,
                                            message: "unterminated /* comment".into(),
                                        })
                                    }
                                    Some('/') if star => break,
                                    Some(c) => star = c == '*',
                                }
                            }
                        }
                        _ => {
                            return Err(SyntaxError {
                                pos: at,
                                message: "a lone '/' (comments are // or /* */)".into(),
                            })
                        }
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, SyntaxError> {
        let pos = self.pos;
        let json = match self.chars.peek().copied() {
            None => return Err(self.error("unexpected end of the document")),
            Some('{') | Some('[') if depth >= MAX_DEPTH => {
                return Err(self.error(format!("nested deeper than {MAX_DEPTH} levels")))
            }
            Some('{') => self.object(depth)?,
            Some('[') => self.array(depth)?,
            Some('"') => Json::Str(self.string()?),
            Some(c) if c == '-' || c.is_ascii_digit() => self.number()?,
            Some(c) if c.is_ascii_alphabetic() => {
                let mut word = String::new();
                while let Some(&c) = self.chars.peek() {
                    if !c.is_ascii_alphanumeric() || word.len() > 16 {
                        break;
                    }
                    word.push(c);
                    self.bump();
                }
                match word.as_str() {
                    "true" => Json::Bool(true),
                    "false" => Json::Bool(false),
                    "null" => Json::Null,
                    _ => {
                        return Err(SyntaxError {
                            pos,
                            message: format!("unexpected word {word:?} (strings need quotes)"),
                        })
                    }
                }
            }
            Some(c) => return Err(self.error(format!("unexpected character {c:?}"))),
        };
        Ok(Value { pos, json })
    }

    fn object(&mut self, depth: usize) -> Result<Json, SyntaxError> {
        self.bump();
        let mut fields: Vec<(String, Pos, Value)> = Vec::new();
        // A set, not a scan of `fields`: a 1 MiB object of short keys
        // would make the scan quadratic.
        let mut seen = std::collections::HashSet::new();
        loop {
            self.skip_space()?;
            match self.chars.peek() {
                Some('}') => {
                    self.bump();
                    return Ok(Json::Object(fields));
                }
                Some('"') => {}
                _ => return Err(self.error("expected a quoted key or '}'")),
            }
            let key_pos = self.pos;
            let key = self.string()?;
            if !seen.insert(key.clone()) {
                return Err(SyntaxError {
                    pos: key_pos,
                    message: format!("duplicate key {key:?}"),
                });
            }
            self.skip_space()?;
            if self.chars.peek() != Some(&':') {
                return Err(self.error(format!("expected ':' after key {key:?}")));
            }
            self.bump();
            self.skip_space()?;
            let v = self.value(depth + 1)?;
            fields.push((key, key_pos, v));
            self.skip_space()?;
            match self.chars.peek() {
                Some(',') => {
                    self.bump();
                }
                Some('}') => {}
                _ => return Err(self.error("expected ',' or '}'")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Json, SyntaxError> {
        self.bump();
        let mut items = Vec::new();
        loop {
            self.skip_space()?;
            if self.chars.peek() == Some(&']') {
                self.bump();
                return Ok(Json::Array(items));
            }
            items.push(self.value(depth + 1)?);
            self.skip_space()?;
            match self.chars.peek() {
                Some(',') => {
                    self.bump();
                }
                Some(']') => {}
                _ => return Err(self.error("expected ',' or ']'")),
            }
        }
    }

    fn string(&mut self) -> Result<String, SyntaxError> {
        let start = self.pos;
        self.bump();
        let mut s = String::new();
        loop {
            match self.bump() {
                None => {
                    return Err(SyntaxError {
                        pos: start,
                        message: "unterminated string".into(),
                    })
                }
                Some('"') => return Ok(s),
                Some('\\') => {
                    let c = match self.bump() {
                        Some('"') => '"',
                        Some('\\') => '\\',
                        Some('/') => '/',
                        Some('b') => '\u{8}',
                        Some('f') => '\u{c}',
                        Some('n') => '\n',
                        Some('r') => '\r',
                        Some('t') => '\t',
                        Some('u') => self.unicode_escape()?,
                        _ => return Err(self.error("bad escape in string")),
                    };
                    s.push(c);
                }
                Some(c) if (c as u32) < 0x20 => {
                    return Err(self.error("control character in string"))
                }
                Some(c) => s.push(c),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, SyntaxError> {
        let mut v = 0;
        for _ in 0..4 {
            let d = self
                .bump()
                .and_then(|c| c.to_digit(16))
                .ok_or_else(|| self.error("bad \\u escape"))?;
            v = v * 16 + d;
        }
        Ok(v)
    }

    fn unicode_escape(&mut self) -> Result<char, SyntaxError> {
        let hi = self.hex4()?;
        let code = if (0xd800..0xdc00).contains(&hi) {
            if self.bump() != Some('\\') || self.bump() != Some('u') {
                return Err(self.error("unpaired surrogate in \\u escape"));
            }
            let lo = self.hex4()?;
            if !(0xdc00..0xe000).contains(&lo) {
                return Err(self.error("unpaired surrogate in \\u escape"));
            }
            0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
        } else {
            hi
        };
        char::from_u32(code).ok_or_else(|| self.error("bad \\u escape"))
    }

    fn number(&mut self) -> Result<Json, SyntaxError> {
        let mut s = String::new();
        while let Some(&c) = self.chars.peek() {
            if !(c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E')) {
                break;
            }
            if s.len() >= 64 {
                return Err(self.error("number too long"));
            }
            s.push(c);
            self.bump();
        }
        if s.parse::<f64>().is_err() {
            return Err(self.error(format!("bad number {s:?}")));
        }
        Ok(Json::Number(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hujson_with_positions() {
        let v =
            parse("// c\n{\n  \"a\": [1, \"x\", true, null,], /* b */\n  \"b\": {},\n}\n").unwrap();
        let Json::Object(f) = v.json else { panic!() };
        assert_eq!(f[0].0, "a");
        assert_eq!(f[0].1, Pos { line: 3, column: 3 });
        let Json::Array(items) = &f[0].2.json else {
            panic!()
        };
        assert_eq!(items.len(), 4);
        assert_eq!(
            items[1].pos,
            Pos {
                line: 3,
                column: 12
            }
        );
        assert_eq!(items[1].json, Json::Str("x".into()));
        assert_eq!(f[1].2.json, Json::Object(vec![]));
    }

    #[test]
    fn syntax_errors_name_the_place() {
        for (text, line, column, what) in [
            ("{\n  \"a\" 1}", 2, 7, "expected ':'"),
            ("{\"a\": 1, \"a\": 2}", 1, 10, "duplicate key"),
            ("[1 2]", 1, 4, "expected ','"),
            ("\"abc", 1, 1, "unterminated string"),
            ("/* x", 1, 1, "unterminated /*"),
            ("{} x", 1, 4, "unexpected text"),
            ("[tru]", 1, 2, "unexpected word"),
            ("[\"\\q\"]", 1, 5, "bad escape"),
            ("[\"\\ud800\"]", 1, 10, "unpaired surrogate"),
            ("[1.2.3]", 1, 7, "bad number"),
            ("", 1, 1, "unexpected end"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.message.contains(what), "{text:?}: {e:?}");
            assert_eq!(
                (e.pos.line, e.pos.column),
                (line, column),
                "{text:?}: {e:?}"
            );
        }
        let deep = "[".repeat(MAX_DEPTH + 1);
        assert!(parse(&deep).unwrap_err().message.contains("nested deeper"));
    }
}
