//! The datapath as user space sees it: loading and attaching the classifier
//! ([`attach`](mod@attach)), and reading and editing its pinned maps ([`maps`]).
//!
//! Everything lives under one bpffs directory (the `--bpffs` option), so
//! several independent instances can coexist on one box:
//!
//! ```text
//! <bpffs>/prog_ingress          the loaded classifier
//! <bpffs>/VISCUM_SERVICES       exact redirect entries (pinned by name by aya)
//! <bpffs>/VISCUM_PREFIXES       LPM trie of prefix / range / source rules
//! <bpffs>/VISCUM_RULES          their targets and counters, by rule id
//! <bpffs>/VISCUM_GLOBAL         global counters
//! <bpffs>/VISCUM_CONFIG         runtime knobs
//! <bpffs>/prog_reply            the reply-path classifier (service veths)
//! <bpffs>/prog_icmp_*           ICMP-error programs, reached by tail call (VISCUM_JUMP)
//! <bpffs>/VISCUM_FLOWS          flow table (LRU), VISCUM_REPLIES its reverse index
//! <bpffs>/links/<ifname>        one TCX link per attached interface (clsact: a record
//!                               directory holding ifindex-N and, when Viscum added the
//!                               qdisc, clsact-created)
//! <bpffs>/targets/<ifindex>/<ifname>  the name of each entry target, to re-point entries
//!                               when a target veth is re-created
//! <bpffs>/reply-links/<ifname>  one TCX link per service veth
//! ```

pub mod attach;
mod clsact;
mod jump;
pub mod maps;

use std::path::{Path, PathBuf};

pub use attach::{
    AttachOutcome, MapSizes, attach, attach_reply, attached_interfaces, detach, detach_reply, purge,
};
pub use maps::{Engine, EntryView, GlobalStats};

/// Errors of the engine. Messages are for the person at the prompt.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "viscum is not attached: no datapath is pinned under {0} (run `viscum attach IFACE` first, or pass the --bpffs used then)"
    )]
    NotAttached(PathBuf),
    #[error("interface {0} does not exist")]
    UnknownInterface(String),
    #[error("'{0}' is not a valid interface name")]
    BadInterfaceName(String),
    #[error("viscum is not attached to {0}")]
    NotAttachedTo(String),
    #[error("an entry for {0} already exists (delete it first to change its target)")]
    Duplicate(String),
    #[error("no entry for {0}")]
    NoSuchEntry(String),
    #[error("the services map is full ({0} entries); attach with a larger --max-entries")]
    Full(u32),
    #[error("{prefix}: an address prefix holds at most {max} rules (port ranges / sources)")]
    PrefixFull { prefix: String, max: usize },
    #[error(transparent)]
    Bpffs(#[from] crate::bpffs::BpffsError),
    #[error("cannot load the classifier into the kernel")]
    Load(#[source] Box<aya::EbpfError>),
    /// `BPF_PROG_LOAD` failed: the verifier (or the kernel) refused a program.
    #[error(
        "kernel {kernel} rejected the classifier {program}: {source}\n  verifier, last lines:\n  {verifier_tail}"
    )]
    Rejected {
        program: String,
        kernel: String,
        #[source]
        source: std::io::Error,
        verifier_tail: String,
    },
    /// The embedded object cannot run on this machine at all.
    #[error("{0}")]
    Unsupported(String),
    #[error("{what}")]
    Program {
        what: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{what}")]
    Map {
        what: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl EngineError {
    pub(crate) fn map(what: impl Into<String>, source: aya::maps::MapError) -> Self {
        EngineError::Map {
            what: what.into(),
            source: Box::new(source),
        }
    }
    pub(crate) fn prog(what: impl Into<String>, source: aya::programs::ProgramError) -> Self {
        EngineError::Program {
            what: what.into(),
            source: Box::new(source),
        }
    }
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        EngineError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Paths of the pins under one bpffs directory.
#[derive(Clone, Debug)]
pub struct Pins {
    pub dir: PathBuf,
}

impl Pins {
    pub fn new(dir: impl AsRef<Path>) -> Self {
        Pins {
            dir: dir.as_ref().to_owned(),
        }
    }
    pub fn program(&self) -> PathBuf {
        self.dir.join("prog_ingress")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn reply_program(&self) -> PathBuf {
        self.dir.join("prog_reply")
    }
    /// The ICMP programs the classifiers tail-call into.
    pub fn icmp_ingress_program(&self) -> PathBuf {
        self.dir.join("prog_icmp_ingress")
    }
    pub fn icmp_reply_program(&self) -> PathBuf {
        self.dir.join("prog_icmp_reply")
    }
    /// Every program pin of the instance.
    pub fn program_pins(&self) -> [PathBuf; 4] {
        [
            self.program(),
            self.reply_program(),
            self.icmp_ingress_program(),
            self.icmp_reply_program(),
        ]
    }
    pub fn reply_links_dir(&self) -> PathBuf {
        self.dir.join("reply-links")
    }
    pub fn reply_link(&self, ifname: &str) -> PathBuf {
        self.reply_links_dir().join(ifname)
    }
    pub fn links_dir(&self) -> PathBuf {
        self.dir.join("links")
    }
    pub fn link(&self, ifname: &str) -> PathBuf {
        self.links_dir().join(ifname)
    }
}

/// Interface index by name, in the calling thread's network namespace.
pub fn ifindex(name: &str) -> Result<u32, EngineError> {
    if name.is_empty()
        || name.len() > 15
        || name.contains('/')
        || name.contains(char::is_whitespace)
    {
        return Err(EngineError::BadInterfaceName(name.to_owned()));
    }
    nix::net::if_::if_nametoindex(name).map_err(|_| EngineError::UnknownInterface(name.to_owned()))
}
