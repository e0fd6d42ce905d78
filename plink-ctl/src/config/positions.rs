//! Maps document paths (`services[1].nat.addresses[0]`) to line and column.
//!
//! serde_yaml forgets positions once a value is deserialized, so semantic
//! errors found afterwards are located by re-reading the text with a marked
//! event parser and recording where every node starts.

use std::collections::HashMap;

use yaml_rust2::{
    parser::{Event, MarkedEventReceiver, Parser},
    scanner::Marker,
};

#[derive(Debug, Default)]
pub struct PositionIndex {
    nodes: HashMap<String, (usize, usize)>,
    /// Scalar values by path, to find a value serde complained about.
    scalars: Vec<(String, String)>,
}

/// A YAML syntax error: 1-based line and column, and what the parser said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

enum Frame {
    Seq { path: String, next: usize },
    Map { path: String, key: Option<String> },
}

/// Deepest nesting accepted (plink's config needs about 5 levels). Paths
/// grow with depth, so unbounded nesting would make indexing quadratic.
pub const MAX_DEPTH: usize = 32;

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    nodes: HashMap<String, (usize, usize)>,
    scalars: Vec<(String, String)>,
    /// Where the nesting first went past `MAX_DEPTH`.
    too_deep: Option<(usize, usize)>,
}

fn join_key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

impl Builder {
    /// Called at the start of every node. Returns the node's path, or None
    /// when the node is a mapping key (recorded as the pending key instead).
    fn node_start(&mut self, key_text: Option<&str>, mark: Marker) -> Option<String> {
        // yaml-rust2 columns are 0-based, lines 1-based.
        let pos = (mark.line(), mark.col() + 1);
        let path = match self.stack.last_mut() {
            None => String::new(),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                p
            }
            Some(Frame::Map { path, key }) => match key.take() {
                None => {
                    // A key. Complex (non-scalar) keys get a placeholder; the
                    // config schema has none, serde reports them.
                    let k = key_text.unwrap_or("?").to_owned();
                    // yaml-rust2 marks a block mapping's start after its first
                    // key; the mapping really starts at its earliest key.
                    if let Some(start) = self.nodes.get_mut(path.as_str())
                        && pos < *start
                    {
                        *start = pos;
                    }
                    // Record the key's position too, under `path.key` unless the
                    // value records a better one.
                    self.nodes.entry(join_key(path, &k)).or_insert(pos);
                    *key = Some(k);
                    return None;
                }
                Some(k) => join_key(path, &k),
            },
        };
        // Value positions override key positions: an error about a value
        // points at the value.
        self.nodes.insert(path.clone(), pos);
        Some(path)
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::SequenceStart(..) | Event::MappingStart(..) if self.stack.len() >= MAX_DEPTH => {
                // Nothing below is indexed; the frame only keeps ends balanced.
                self.too_deep.get_or_insert((mark.line(), mark.col() + 1));
                self.stack.push(Frame::Seq {
                    path: "?".into(),
                    next: 0,
                });
            }
            Event::Scalar(..) | Event::Alias(_) if self.stack.len() > MAX_DEPTH => {}
            Event::Scalar(text, ..) => {
                if let Some(path) = self.node_start(Some(&text), mark) {
                    self.scalars.push((path, text));
                }
            }
            Event::Alias(_) => {
                self.node_start(None, mark);
            }
            Event::SequenceStart(..) => {
                if let Some(path) = self.node_start(None, mark) {
                    self.stack.push(Frame::Seq { path, next: 0 });
                } else {
                    // A sequence used as a key: track it so ends still balance.
                    self.stack.push(Frame::Seq {
                        path: "?".into(),
                        next: 0,
                    });
                }
            }
            Event::MappingStart(..) => {
                let path = self.node_start(None, mark).unwrap_or_else(|| "?".into());
                self.stack.push(Frame::Map { path, key: None });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

impl PositionIndex {
    /// Indexes the first document of `text`, or says where its syntax is wrong.
    pub fn build(text: &str) -> Result<Self, SyntaxError> {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        parser.load(&mut builder, false).map_err(|e| SyntaxError {
            line: e.marker().line(),
            column: e.marker().col() + 1,
            message: e.info().to_owned(),
        })?;
        if let Some((line, column)) = builder.too_deep {
            return Err(SyntaxError {
                line,
                column,
                message: format!("nesting deeper than {MAX_DEPTH} levels is not accepted"),
            });
        }
        Ok(Self {
            nodes: builder.nodes,
            scalars: builder.scalars,
        })
    }

    /// The path and position of the first scalar at or under `under` whose
    /// text is `value`.
    pub fn find_scalar(&self, under: &str, value: &str) -> Option<(&str, (usize, usize))> {
        self.scalars
            .iter()
            .filter(|(path, text)| {
                text == value
                    && (under.is_empty()
                        || path == under
                        || path.starts_with(&format!("{under}."))
                        || path.starts_with(&format!("{under}[")))
            })
            .find_map(|(path, _)| self.nodes.get(path).map(|&pos| (path.as_str(), pos)))
    }

    /// The position of `path`, or of its nearest ancestor that exists (a
    /// missing field is reported at its parent mapping); 1:1 as a last resort.
    pub fn locate(&self, path: &str) -> (usize, usize) {
        let mut p = path;
        loop {
            if let Some(&pos) = self.nodes.get(p) {
                return pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.nodes.get("").copied().unwrap_or((1, 1)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_and_flow_nodes_are_located() {
        let text = "\
gateway:
  xdp_mode: native
services:
  - name: orders
    nat: {addresses: [198.51.100.200, 198.51.100.201], ports: 1024-65535}
  - name: billing
";
        let idx = PositionIndex::build(text).expect("valid YAML");
        assert_eq!(idx.locate("gateway.xdp_mode"), (2, 13));
        assert_eq!(idx.locate("services[0].name"), (4, 11));
        assert_eq!(idx.locate("services[0].nat.addresses[1]"), (5, 39));
        assert_eq!(idx.locate("services[0].nat.ports"), (5, 63));
        assert_eq!(idx.locate("services[1].name"), (6, 11));
        assert_eq!(
            idx.find_scalar("services[0].nat", "1024-65535"),
            Some(("services[0].nat.ports", (5, 63)))
        );
        // A missing field falls back to its parent mapping.
        assert_eq!(idx.locate("services[1].protocol"), (6, 5));
    }

    #[test]
    fn syntax_error_is_located() {
        let e =
            PositionIndex::build("a:\n  b: [1, 2\n  c: 3\n").expect_err("unclosed flow sequence");
        assert_eq!((e.line, e.column), (3, 4), "{e:?}");
    }
}
