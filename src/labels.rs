//! Class labels: the names shown for class ids. COCO's names ship in `models/coco_labels.txt`
//! (compiled in); users can supply their own file.
//!
//! File format: one label per line. Either every line is `<class_id> <name>` (ids may have gaps,
//! as COCO's do), or every line is just a name and line N (1-based, counting non-comment lines)
//! names class id N. Lines starting with `#` and blank lines are ignored.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};

/// The COCO label file shipped with the project.
pub const COCO_LABELS: &str = include_str!("../models/coco_labels.txt");

/// A map from 1-based class id to name.
#[derive(Clone, Debug, PartialEq)]
pub struct Labels {
    names: BTreeMap<u32, String>,
}

impl Labels {
    /// COCO's 80 category names at their 90-id positions.
    pub fn coco() -> Self {
        // The embedded file is tested; fall back to an empty map rather than panic.
        Self::parse(COCO_LABELS).unwrap_or(Labels {
            names: BTreeMap::new(),
        })
    }

    /// Reads a label file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Labels {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::parse(&text).map_err(|reason| Error::Labels {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Parses label-file text (see the module docs for the format).
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let lines: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
            .collect();
        if lines.is_empty() {
            return Err("no labels in file".into());
        }
        let with_id = |l: &str| -> Option<(u32, String)> {
            let (id, name) = l.split_once(char::is_whitespace)?;
            let id: u32 = id.parse().ok()?;
            Some((id, name.trim().to_string()))
        };
        let explicit = lines.iter().all(|(_, l)| with_id(l).is_some());
        let mut names = BTreeMap::new();
        for (n, (line_no, l)) in lines.iter().enumerate() {
            let (id, name) = if explicit {
                with_id(l).ok_or_else(|| format!("line {line_no}: expected `<id> <name>`"))?
            } else {
                (n as u32 + 1, l.to_string())
            };
            if id == 0 {
                return Err(format!("line {line_no}: class ids start at 1"));
            }
            if names.insert(id, name).is_some() {
                return Err(format!("line {line_no}: class id {id} appears twice"));
            }
        }
        Ok(Labels { names })
    }

    /// The name of `class_id`, or `class_<id>` when the file does not name it.
    pub fn name(&self, class_id: u32) -> String {
        self.names
            .get(&class_id)
            .cloned()
            .unwrap_or_else(|| format!("class_{class_id}"))
    }

    /// Number of named classes.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coco_has_80_names_at_their_ids() {
        let l = Labels::coco();
        assert_eq!(l.len(), 80);
        assert_eq!(l.name(1), "person");
        assert_eq!(l.name(90), "toothbrush");
        assert_eq!(l.name(13), "stop sign");
        assert_eq!(l.name(12), "class_12");
    }

    #[test]
    fn plain_lists_number_from_one() {
        let l = Labels::parse("# mine\ncat\n\ndog\n").unwrap();
        assert_eq!(l.name(1), "cat");
        assert_eq!(l.name(2), "dog");
    }

    #[test]
    fn malformed_files_are_errors() {
        assert!(Labels::parse("# nothing\n").is_err());
        assert!(Labels::parse("0 background\n").is_err());
        assert!(Labels::parse("1 a\n1 b\n").is_err());
    }
}
