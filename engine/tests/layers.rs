//! The layers of `engine/src`, held to the table in `src/lib.rs`.
//!
//! The table is read from `lib.rs` itself (its first column names the rows,
//! bottom to top: `a`, `a::b` or `a::{b, c}`), so there is one table. Each
//! file under `src/` belongs to the row whose module path is the longest
//! prefix of its own (`supervisor/session.rs` is `supervisor::session`, a row
//! of its own; `supervisor/agent.rs` falls to `supervisor`). Then:
//!
//! - every `crate::a::b...` and `super::...` path a file names (in `use`
//!   lines and in code, tests included) must land in its own row or one
//!   below it;
//! - files of rows marked `no` in the I/O column are sans-IO: no sockets,
//!   threads, files, clock reads, unsafe or I/O crates (the test modules at
//!   the end of a file may read the clock for a starting instant);
//! - every file of `src/` belongs to a row, and every row holds a file.
//!
//! Text-level, as the compiler would see it after a crate split, without
//! splitting: a path the compiler resolves through a re-export counts where
//! the path points (`crate::supervisor::DialError` is the supervisor's I/O
//! row; `crate::supervisor::error::DialError` its protocol row).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

/// Upward imports known today, each with the change that removes it. A
/// listed import that no longer occurs fails the test too: delete its line.
const KNOWN_UPWARD: &[(&str, &str)] = &[
    // The mesh dialer implements the supervisor's `TargetDialer`; the ffi
    // split moves `TargetDialer`/`DialedTarget`/`OsDialer` into `io::dial`,
    // after which netstack no longer names the supervisor.
    ("netstack/dialer.rs", "supervisor"),
    // The relay client dials with the agent's websocket helpers
    // (`check_url`, `open_websocket`, `Backoff`, `WebsocketTarget`); the
    // shared reconnecting websocket client replaces them and belongs in
    // `ws/`, after which the relay no longer names the supervisor.
    ("relay/client.rs", "supervisor"),
];

/// Words a sans-IO file must not contain (outside comments and strings).
const IO_WORDS: &[&str] = &[
    "Instant::now",
    "SystemTime::now",
    "std::thread",
    "thread::spawn",
    "std::fs",
    "std::process",
    "TcpStream",
    "TcpListener",
    "UdpSocket",
    "UnixStream",
    "ToSocketAddrs",
    "mio::",
    "tungstenite",
    "rustls",
    "socket2",
    "libc::",
    "quinn_udp",
    "unsafe",
];

#[derive(Debug)]
struct Row {
    /// Module paths, `::`-joined; "" is the crate root.
    modules: Vec<String>,
    sans_io: bool,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Finding {
    file: String,
    what: String,
}

/// The rows of the layer table in `lib.rs`, bottom to top, then the crate
/// root (`lib.rs` itself) on top.
fn table(lib_rs: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    for line in lib_rs.lines() {
        let Some(rest) = line.trim_start().strip_prefix("//! | `") else {
            continue;
        };
        let Some(end) = rest.find('`') else { continue };
        let cells: Vec<&str> = rest.trim_end().trim_end_matches('|').split('|').collect();
        let io = cells.last().map_or("", |c| c.trim());
        rows.push(Row {
            modules: expand(&rest[..end]),
            sans_io: io == "no",
        });
    }
    rows.push(Row {
        modules: vec![String::new()],
        sans_io: false,
    });
    rows
}

/// `a::{b, c}` -> `a::b`, `a::c`; `a` -> `a`.
fn expand(name: &str) -> Vec<String> {
    match name.split_once("::{") {
        Some((base, list)) => list
            .trim_end_matches('}')
            .split(',')
            .map(|m| format!("{base}::{}", m.trim()))
            .collect(),
        None => vec![name.to_string()],
    }
}

/// The row of a module path: the longest table entry that is a prefix of it.
fn row_of(rows: &[Row], module: &[String]) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (i, row) in rows.iter().enumerate() {
        for m in &row.modules {
            let parts: Vec<&str> = if m.is_empty() {
                Vec::new()
            } else {
                m.split("::").collect()
            };
            // The crate root's row holds `lib.rs` only.
            let fits = if parts.is_empty() {
                module.is_empty()
            } else {
                parts.len() <= module.len() && parts.iter().zip(module).all(|(a, b)| a == b)
            };
            if fits && best.is_none_or(|(len, _)| parts.len() > len) {
                best = Some((parts.len(), i));
            }
        }
    }
    best.map(|(_, i)| i)
}

/// The module path of a file under `src/`: `a/b.rs` and `a/b/mod.rs` are
/// `a::b`; `lib.rs` is the root.
fn module_of(file: &str) -> Vec<String> {
    let path = file.trim_end_matches(".rs");
    let mut parts: Vec<String> = path.split('/').map(str::to_string).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// The code of a file without comments, string and char literals (so a
/// doc line or a message naming a path does not count).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let end = src[i + 2..].find("*/").map_or(b.len(), |e| i + 2 + e + 2);
            i = end;
            out.push(' ');
        } else if b[i] == b'"' || (b[i] == b'r' && b[i..].starts_with(b"r#\"")) {
            // Raw strings: r#"..."#; plain strings: "..." with escapes.
            if b[i] == b'r' {
                let end = src[i + 3..].find("\"#").map_or(b.len(), |e| i + 3 + e + 2);
                i = end;
            } else {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            out.push_str("\"\"");
        } else if b[i] == b'\'' && i + 2 < b.len() && (b[i + 2] == b'\'' || b[i + 1] == b'\\') {
            // A char literal ('x' or '\n'); lifetimes ('a) are left alone.
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("' '");
        } else {
            let ch = src[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Reads a path after `at` (just past `crate::` or the `super::`s) and
/// returns every full path it names, `{...}` groups expanded.
fn paths_at(code: &str, at: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let b = code.as_bytes();
    let mut i = at;
    let mut path = prefix;
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < b.len() && b[i] == b'{' {
            // A group: each comma-separated item at depth 1 is a path.
            let mut depth = 0;
            let mut start = i + 1;
            while i < b.len() {
                match b[i] {
                    b'{' => depth += 1,
                    b'}' | b',' if depth == 1 => {
                        paths_at(code, start, path.clone(), out);
                        start = i + 1;
                        if b[i] == b'}' {
                            return;
                        }
                    }
                    b'}' => depth -= 1,
                    _ => {}
                }
                i += 1;
            }
            return;
        }
        let s = i;
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        if s == i {
            break;
        }
        let word = &code[s..i];
        if word != "self" {
            path.push(word.to_string());
        }
        if code[i..].starts_with("::") {
            i += 2;
        } else {
            break;
        }
    }
    out.push(path);
}

/// The inline modules (`mod tests { ... }`) of a file: where each one's
/// body starts and ends, and its name.
fn inline_modules(code: &str) -> Vec<(usize, usize, String)> {
    let b = code.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while let Some(pos) = code[i..].find("mod ").map(|p| p + i) {
        i = pos + 4;
        if pos > 0 && is_ident(b[pos - 1]) {
            continue;
        }
        let s = i;
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        let name = &code[s..i];
        let mut j = i;
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        if name.is_empty() || j >= b.len() || b[j] != b'{' {
            continue;
        }
        let mut depth = 0;
        let mut k = j;
        while k < b.len() {
            match b[k] {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
            k += 1;
        }
        found.push((j, k, name.to_string()));
    }
    found
}

/// Every crate-internal path a file names, as absolute module paths.
fn imports(file: &str, code: &str) -> Vec<Vec<String>> {
    let file_module = module_of(file);
    let inline = inline_modules(code);
    // `super` in `a/b.rs` (module a::b) is `a`; in `a/mod.rs` (module a) the
    // root: both are the file's module minus one.
    let mut out = Vec::new();
    let b = code.as_bytes();
    let mut i = 0;
    while let Some(pos) = code[i..].find("crate::").map(|p| p + i) {
        let before = if pos == 0 { b' ' } else { b[pos - 1] };
        if !is_ident(before) {
            paths_at(code, pos + "crate::".len(), Vec::new(), &mut out);
        }
        i = pos + 1;
    }
    i = 0;
    while let Some(pos) = code[i..].find("super::").map(|p| p + i) {
        let before = if pos == 0 { b' ' } else { b[pos - 1] };
        let follows_super = code[..pos].ends_with("super::");
        if !is_ident(before) && !follows_super {
            // `super` is relative to the module the path is written in,
            // which may be a `mod tests { ... }` inside the file.
            let mut base = file_module.clone();
            for (start, end, name) in &inline {
                if *start < pos && pos < *end {
                    base.push(name.clone());
                }
            }
            let mut at = pos;
            while code[at..].starts_with("super::") {
                base.pop();
                at += "super::".len();
            }
            paths_at(code, at, base, &mut out);
        }
        i = pos + 1;
    }
    out
}

/// Checks `files` (path under `src/` -> contents) against the table in the
/// file `lib.rs` among them, with `known` upward imports allowed.
fn check(files: &BTreeMap<String, String>, known: &[(&str, &str)]) -> Vec<Finding> {
    let rows = table(&files["lib.rs"]);
    let name = |r: usize| match rows[r].modules.as_slice() {
        [m] if m.is_empty() => "the crate root".to_string(),
        ms => ms.join(", "),
    };
    let mut found = Vec::new();
    let mut used_known = vec![false; known.len()];
    let mut rows_seen = vec![false; rows.len()];
    for (file, src) in files {
        let Some(own) = row_of(&rows, &module_of(file)) else {
            found.push(Finding {
                file: file.clone(),
                what: "belongs to no row of the layer table in lib.rs: add its module there".into(),
            });
            continue;
        };
        rows_seen[own] = true;
        let code = code_only(src);
        let mut seen = Vec::new();
        for path in imports(file, &code) {
            let Some(to) = row_of(&rows, &path) else {
                continue;
            };
            if to <= own || seen.contains(&to) {
                continue;
            }
            seen.push(to);
            let target = name(to);
            if let Some(k) = known.iter().position(|&(f, t)| f == file && t == target) {
                used_known[k] = true;
                continue;
            }
            found.push(Finding {
                file: file.clone(),
                what: format!(
                    "imports {} (`crate::{}`), a layer above its own ({})",
                    target,
                    path.join("::"),
                    name(own)
                ),
            });
        }
        if rows[own].sans_io {
            // The test module at the end may read the clock or open sockets.
            let body = code.split("#[cfg(test)]").next().unwrap_or("");
            let body = if file.ends_with("/tests.rs") {
                ""
            } else {
                body
            };
            for word in IO_WORDS {
                if body.contains(word) {
                    found.push(Finding {
                        file: file.clone(),
                        what: format!("is sans-IO ({}) but uses `{word}`", name(own)),
                    });
                }
            }
        }
    }
    for (k, used) in used_known.iter().enumerate() {
        if !used {
            found.push(Finding {
                file: known[k].0.to_string(),
                what: format!(
                    "no longer imports {}: delete its line from KNOWN_UPWARD",
                    known[k].1
                ),
            });
        }
    }
    for (r, seen) in rows_seen.iter().enumerate() {
        if !seen {
            found.push(Finding {
                file: "lib.rs".into(),
                what: format!("the layer table names {}, which has no file", name(r)),
            });
        }
    }
    found
}

fn read_tree(dir: &Path, base: &Path, files: &mut BTreeMap<String, String>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            read_tree(&path, base, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            files.insert(rel, fs::read_to_string(&path).unwrap());
        }
    }
}

#[test]
fn no_module_imports_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    read_tree(&src, &src, &mut files);
    assert!(files.len() > 50, "read only {} files", files.len());
    let found = check(&files, KNOWN_UPWARD);
    let text: Vec<String> = found
        .iter()
        .map(|f| format!("{}: {}", f.file, f.what))
        .collect();
    assert!(found.is_empty(), "layer violations:\n{}", text.join("\n"));
}

// The checker itself, on small synthetic trees.

const LIB: &str = "\
//! | module | owns | I/O |
//! |---|---|---|
//! | `wire` | views | no |
//! | `proto::{codec, session}` | sans-IO protocol | no |
//! | `net` | sockets | yes |
//! | `proto` | protocol I/O | yes |
pub mod net;
";

fn tree(extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut files: BTreeMap<String, String> = [
        ("lib.rs", LIB),
        ("wire/mod.rs", "pub struct View;"),
        ("proto/codec.rs", "use crate::wire::View;"),
        ("proto/session.rs", "use super::codec;"),
        (
            "net/mod.rs",
            "use crate::{wire::View, proto::session::Session};",
        ),
        ("proto/mod.rs", "pub mod codec; use crate::net::Socket;"),
    ]
    .iter()
    .map(|(f, s)| (f.to_string(), s.to_string()))
    .collect();
    for (f, s) in extra {
        files.insert(f.to_string(), s.to_string());
    }
    files
}

#[test]
fn checker_passes_a_tree_that_imports_only_downward() {
    assert_eq!(check(&tree(&[]), &[]), vec![]);
}

#[test]
fn checker_reports_an_upward_use() {
    let found = check(&tree(&[("wire/ip.rs", "use crate::net::Socket;")]), &[]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].file, "wire/ip.rs");
    assert!(found[0].what.contains("imports net"), "{found:?}");
}

#[test]
fn checker_reports_upward_paths_in_groups_in_code_and_through_super() {
    let found = check(
        &tree(&[
            ("net/a.rs", "use crate::{wire::{self, View}, proto::Agent};"),
            ("net/b.rs", "fn f() { crate::proto::dial(); }"),
            // From the sans-IO row up to the I/O file next to it.
            ("proto/codec.rs", "use super::agent::Agent;"),
        ]),
        &[],
    );
    let files: Vec<&str> = found.iter().map(|f| f.file.as_str()).collect();
    assert_eq!(
        files,
        ["net/a.rs", "net/b.rs", "proto/codec.rs"],
        "{found:?}"
    );
}

#[test]
fn checker_ignores_comments_and_strings() {
    let found = check(
        &tree(&[(
            "wire/ip.rs",
            "//! see crate::net::Socket\n/* crate::net */ fn f() -> &'static str { \"crate::net::x\" }",
        )]),
        &[],
    );
    assert_eq!(found, vec![]);
}

#[test]
fn checker_holds_sans_io_rows() {
    let found = check(
        &tree(&[(
            "proto/session.rs",
            "fn f() { let t = std::time::Instant::now(); }\n#[cfg(test)]\nmod tests { fn g() { std::time::Instant::now(); } }",
        )]),
        &[],
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].what.contains("Instant::now"), "{found:?}");
}

#[test]
fn checker_allows_a_known_upward_import_and_reports_a_stale_one() {
    let upward = tree(&[("wire/ip.rs", "use crate::net::Socket;")]);
    assert_eq!(check(&upward, &[("wire/ip.rs", "net")]), vec![]);
    let found = check(&tree(&[]), &[("wire/ip.rs", "net")]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].what.contains("delete its line"), "{found:?}");
}

#[test]
fn checker_reports_a_file_outside_the_table() {
    let found = check(&tree(&[("filter/mod.rs", "")]), &[]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].what.contains("no row"), "{found:?}");
}
