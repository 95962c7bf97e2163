//! Where each value of a RON model file starts, by spec path.
//!
//! serde hands validated values no positions, so after `ron` has parsed a file we
//! walk its tokens once more and record the line and column of every value under the
//! path the validator uses (`connector.router.top_k`, `directions[1].target`,
//! `optimizer.betas.0`). Syntax is `ron`'s business: this walk runs only on text `ron`
//! accepted and only needs to follow nesting.

use std::collections::BTreeMap;
use std::fmt;

/// A 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

#[derive(Debug, Default)]
pub struct SourceMap {
    positions: BTreeMap<String, Position>,
}

impl SourceMap {
    pub fn build(src: &str) -> SourceMap {
        let tokens = tokenize(src);
        let mut walker = Walker {
            tokens: &tokens,
            at: 0,
            map: SourceMap::default(),
        };
        walker.value(String::new());
        walker.map
    }

    /// The position of `path`, or of its nearest recorded ancestor (a field left to
    /// its default has no text of its own).
    pub fn locate(&self, path: &str) -> Option<Position> {
        let mut p = path;
        loop {
            if let Some(pos) = self.positions.get(p) {
                return Some(*pos);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

#[derive(Debug, PartialEq)]
enum Tok<'a> {
    Ident(&'a str),
    Str(&'a str),
    Atom,
    Open(char),
    Close,
    Comma,
    Colon,
}

fn tokenize(src: &str) -> Vec<(Tok<'_>, Position)> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut line, mut line_start) = (0, 1, 0);
    while i < bytes.len() {
        let pos = Position {
            line,
            col: src[line_start..i].chars().count() + 1,
        };
        let b = bytes[i];
        let start = i;
        match b {
            b'\n' => {
                i += 1;
                line += 1;
                line_start = i;
                continue;
            }
            b if b.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < bytes.len() {
                    if bytes[i..].starts_with(b"/*") {
                        depth += 1;
                        i += 2;
                    } else if bytes[i..].starts_with(b"*/") {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        if bytes[i] == b'\n' {
                            line += 1;
                            line_start = i + 1;
                        }
                        i += 1;
                    }
                }
                continue;
            }
            b'"' | b'\'' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                let inner = &src[start + 1..(i - 1).max(start + 1)];
                out.push((
                    if b == b'"' {
                        Tok::Str(inner)
                    } else {
                        Tok::Atom
                    },
                    pos,
                ));
                continue;
            }
            b'r' if matches!(bytes.get(i + 1), Some(b'"') | Some(b'#')) => {
                let hashes = bytes[i + 1..].iter().take_while(|&&c| c == b'#').count();
                let close: Vec<u8> = std::iter::once(b'"')
                    .chain(std::iter::repeat_n(b'#', hashes))
                    .collect();
                i += 2 + hashes;
                let body = i;
                while i < bytes.len() && !bytes[i..].starts_with(&close) {
                    if bytes[i] == b'\n' {
                        line += 1;
                        line_start = i + 1;
                    }
                    i += 1;
                }
                out.push((Tok::Str(&src[body..i.min(bytes.len())]), pos));
                i += close.len();
                continue;
            }
            b'(' | b'[' | b'{' => out.push((Tok::Open(b as char), pos)),
            b')' | b']' | b'}' => out.push((Tok::Close, pos)),
            b',' => out.push((Tok::Comma, pos)),
            b':' => out.push((Tok::Colon, pos)),
            _ => {
                let word = |c: u8| {
                    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'+' | b'-' | b'#')
                };
                while i < bytes.len() && (word(bytes[i]) || !bytes[i].is_ascii()) {
                    i += 1;
                }
                let text = &src[start..i.max(start + 1)];
                let first = text.as_bytes()[0];
                let is_ident =
                    first.is_ascii_alphabetic() || first == b'_' || text.starts_with("r#");
                out.push((
                    if is_ident && !matches!(text, "inf" | "NaN") {
                        Tok::Ident(text)
                    } else {
                        Tok::Atom
                    },
                    pos,
                ));
                i = i.max(start + 1);
                continue;
            }
        }
        i += 1;
    }
    out
}

struct Walker<'t, 'a> {
    tokens: &'t [(Tok<'a>, Position)],
    at: usize,
    map: SourceMap,
}

impl Walker<'_, '_> {
    fn peek(&self, ahead: usize) -> Option<&Tok<'_>> {
        self.tokens.get(self.at + ahead).map(|(t, _)| t)
    }

    fn value(&mut self, path: String) {
        let Some((tok, pos)) = self.tokens.get(self.at) else {
            return;
        };
        self.map.positions.entry(path.clone()).or_insert(*pos);
        match tok {
            Tok::Ident(_) if self.peek(1) == Some(&Tok::Open('(')) => {
                self.at += 2;
                self.group(&path);
            }
            Tok::Open('(') => {
                self.at += 1;
                self.group(&path);
            }
            Tok::Open('[') => {
                self.at += 1;
                self.sequence(&path);
            }
            Tok::Open(_) => {
                self.at += 1;
                self.map_entries(&path);
            }
            _ => self.at += 1,
        }
    }

    /// Walks comma-separated items up to and including the closing bracket, `item`
    /// consuming each one.
    fn items(&mut self, mut item: impl FnMut(&mut Self)) {
        while let Some(tok) = self.peek(0) {
            match tok {
                Tok::Close => {
                    self.at += 1;
                    return;
                }
                Tok::Comma => self.at += 1,
                _ => item(self),
            }
        }
    }

    /// `( field: value, ... )` or `( value, ... )`.
    fn group(&mut self, path: &str) {
        let mut index = 0;
        self.items(|w| match w.peek(0) {
            Some(Tok::Ident(name)) if w.peek(1) == Some(&Tok::Colon) => {
                let child = join(path, name.trim_start_matches("r#"));
                w.at += 2;
                w.value(child);
            }
            _ => {
                w.value(join(path, &index.to_string()));
                index += 1;
            }
        });
    }

    /// `[ value, ... ]`.
    fn sequence(&mut self, path: &str) {
        let mut index = 0;
        self.items(|w| {
            w.value(format!("{path}[{index}]"));
            index += 1;
        });
    }

    /// `{ key: value, ... }`.
    fn map_entries(&mut self, path: &str) {
        self.items(|w| match w.peek(0) {
            Some(Tok::Str(key) | Tok::Ident(key)) => {
                let child = join(path, key);
                w.at += 1;
                if w.peek(0) == Some(&Tok::Colon) {
                    w.at += 1;
                }
                w.value(child);
            }
            _ => w.at += 1,
        });
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_fields_elements_map_entries_and_falls_back_to_parents() {
        let src = "Model(\n  a: (b: 3, c: [1, X(d: \"s\")]),\n  // comment: (\n  m: {\"k\": 2},\n  t: (0.5, -1e-3),\n)";
        let map = SourceMap::build(src);
        let at = |p: &str| map.locate(p).map(|p| (p.line, p.col));
        assert_eq!(at("a"), Some((2, 6)));
        assert_eq!(at("a.b"), Some((2, 10)));
        assert_eq!(at("a.c[1]"), Some((2, 20)));
        assert_eq!(at("a.c[1].d"), Some((2, 25)));
        assert_eq!(at("m.k"), Some((4, 12)));
        assert_eq!(at("t.1"), Some((5, 12)));
        assert_eq!(
            at("a.missing"),
            Some((2, 6)),
            "a defaulted field points at its parent"
        );
    }
}
