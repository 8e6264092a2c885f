//! The root filesystem as a tree of entries, each with an explicit owner,
//! mode and modification time.
//!
//! Nothing here touches the host's filesystem: entries hold their content in
//! memory, and every writer (squashfs, cpio, SBOM) walks the same tree in
//! the same sorted order, which is what makes builds reproducible.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// Owner, permissions and time of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Permission bits, including setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
}

impl Meta {
    /// Root-owned with the given permission bits.
    pub fn root(mode: u32, mtime: u64) -> Meta {
        Meta { uid: 0, gid: 0, mode, mtime }
    }
}

/// What kind of entry, and its content.
#[derive(Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory.
    Dir,
    /// A regular file and its bytes.
    File(Arc<Vec<u8>>),
    /// A symbolic link and its target.
    Symlink(String),
}

impl fmt::Debug for NodeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeKind::Dir => f.write_str("Dir"),
            NodeKind::File(data) => write!(f, "File({} bytes)", data.len()),
            NodeKind::Symlink(target) => write!(f, "Symlink({target:?})"),
        }
    }
}

/// Where an entry came from, for the SBOM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Made by basalt itself (our binaries, generated configuration,
    /// standard directories).
    Build,
    /// Added by the recipe; the string names the recipe entry.
    Recipe(String),
    /// Taken from the kernel input; the string names the package or folder.
    Kernel(String),
}

/// One entry of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Kind and content.
    pub kind: NodeKind,
    /// Owner, mode, time.
    pub meta: Meta,
    /// Provenance.
    pub origin: Origin,
}

/// A path that cannot go into the tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// Not absolute, or has empty, `.` or `..` components.
    #[error("path {0:?} is not a clean absolute path (no `.`, `..` or `//`)")]
    BadPath(String),
    /// A file or symlink stands where a directory is needed.
    #[error("cannot create {path:?}: {parent:?} is not a directory")]
    NotADirectory {
        /// The path being added.
        path: String,
        /// The ancestor that is in the way.
        parent: String,
    },
    /// Something already stands at the path.
    #[error("{0:?} is added twice; each path may come from one place only")]
    Exists(String),
}

/// The whole tree, keyed by absolute path (`/` is the root).
#[derive(Debug, Clone)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
    /// Metadata given to directories created implicitly as parents.
    parent_meta: Meta,
}

/// True for a clean absolute path: `/`-rooted, no empty, `.` or `..`
/// components, no trailing `/`, not `/` itself.
pub fn is_clean_path(path: &str) -> bool {
    path.starts_with('/')
        && path.len() > 1
        && !path.ends_with('/')
        && path[1..].split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

fn check_path(path: &str) -> Result<(), TreeError> {
    if is_clean_path(path) {
        Ok(())
    } else {
        Err(TreeError::BadPath(path.to_string()))
    }
}

/// The parent of a clean absolute path (`/` for top-level entries).
pub fn parent_of(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

impl Tree {
    /// An empty tree whose root and implicit parents get `dir_meta`.
    pub fn new(dir_meta: Meta) -> Tree {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            "/".to_string(),
            Node { kind: NodeKind::Dir, meta: dir_meta, origin: Origin::Build },
        );
        Tree { nodes, parent_meta: dir_meta }
    }

    fn ensure_parents(&mut self, path: &str) -> Result<(), TreeError> {
        let parent = parent_of(path);
        if parent == "/" {
            return Ok(());
        }
        match self.nodes.get(parent) {
            Some(Node { kind: NodeKind::Dir, .. }) => Ok(()),
            Some(_) => {
                Err(TreeError::NotADirectory { path: path.to_string(), parent: parent.to_string() })
            }
            None => {
                self.ensure_parents(parent)?;
                self.nodes.insert(
                    parent.to_string(),
                    Node { kind: NodeKind::Dir, meta: self.parent_meta, origin: Origin::Build },
                );
                Ok(())
            }
        }
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<(), TreeError> {
        check_path(path)?;
        self.ensure_parents(path)?;
        if self.nodes.contains_key(path) {
            return Err(TreeError::Exists(path.to_string()));
        }
        self.nodes.insert(path.to_string(), node);
        Ok(())
    }

    /// Adds a directory. An implicitly created directory at the same path
    /// takes the new metadata and origin.
    pub fn add_dir(&mut self, path: &str, meta: Meta, origin: Origin) -> Result<(), TreeError> {
        check_path(path)?;
        if let Some(existing) = self.nodes.get_mut(path) {
            if existing.kind == NodeKind::Dir {
                existing.meta = meta;
                existing.origin = origin;
                return Ok(());
            }
            return Err(TreeError::Exists(path.to_string()));
        }
        self.insert(path, Node { kind: NodeKind::Dir, meta, origin })
    }

    /// Adds a regular file.
    pub fn add_file(
        &mut self,
        path: &str,
        data: impl Into<Arc<Vec<u8>>>,
        meta: Meta,
        origin: Origin,
    ) -> Result<(), TreeError> {
        self.insert(path, Node { kind: NodeKind::File(data.into()), meta, origin })
    }

    /// Adds a symbolic link.
    pub fn add_symlink(
        &mut self,
        path: &str,
        target: &str,
        meta: Meta,
        origin: Origin,
    ) -> Result<(), TreeError> {
        self.insert(path, Node { kind: NodeKind::Symlink(target.to_string()), meta, origin })
    }

    /// The entry at `path`, if any.
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    /// Every entry including the root, sorted by path: a parent always
    /// comes before its children.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Node)> {
        self.nodes.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The direct children of a directory, sorted by name.
    pub fn children<'a>(&'a self, dir: &'a str) -> impl Iterator<Item = (&'a str, &'a Node)> + 'a {
        self.nodes
            .iter()
            .filter(move |(k, _)| k.as_str() != "/" && parent_of(k) == dir)
            .map(|(k, v)| (k.as_str(), v))
    }

    /// Number of entries, the root included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when only the root exists.
    pub fn is_empty(&self) -> bool {
        self.nodes.len() == 1
    }

    /// Total bytes of regular-file content.
    pub fn file_bytes(&self) -> u64 {
        self.nodes
            .values()
            .map(|n| match &n.kind {
                NodeKind::File(d) => d.len() as u64,
                _ => 0,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_created_and_sorted_first() {
        let mut t = Tree::new(Meta::root(0o755, 7));
        t.add_file("/usr/bin/x", vec![1], Meta::root(0o755, 7), Origin::Build).unwrap();
        t.add_file("/usr/bin-x", vec![2], Meta::root(0o644, 7), Origin::Build).unwrap();
        let paths: Vec<_> = t.iter().map(|(p, _)| p).collect();
        assert_eq!(paths, ["/", "/usr", "/usr/bin", "/usr/bin-x", "/usr/bin/x"]);
        let kids: Vec<_> = t.children("/usr").map(|(p, _)| p).collect();
        assert_eq!(kids, ["/usr/bin", "/usr/bin-x"]);
    }

    #[test]
    fn bad_paths_and_duplicates_are_refused() {
        let mut t = Tree::new(Meta::root(0o755, 0));
        for bad in ["rel", "/a/../b", "/a//b", "/a/", "/"] {
            assert!(matches!(
                t.add_file(bad, vec![], Meta::root(0o644, 0), Origin::Build),
                Err(TreeError::BadPath(_))
            ));
        }
        t.add_file("/f", vec![], Meta::root(0o644, 0), Origin::Build).unwrap();
        assert!(matches!(
            t.add_file("/f", vec![], Meta::root(0o644, 0), Origin::Build),
            Err(TreeError::Exists(_))
        ));
        assert!(matches!(
            t.add_file("/f/g", vec![], Meta::root(0o644, 0), Origin::Build),
            Err(TreeError::NotADirectory { .. })
        ));
    }

    #[test]
    fn explicit_dir_takes_over_an_implicit_one() {
        let mut t = Tree::new(Meta::root(0o755, 0));
        t.add_file("/data/x", vec![], Meta::root(0o644, 0), Origin::Build).unwrap();
        t.add_dir("/data", Meta { uid: 1, gid: 2, mode: 0o700, mtime: 0 }, Origin::Build).unwrap();
        assert_eq!(t.get("/data").unwrap().meta.mode, 0o700);
    }
}
