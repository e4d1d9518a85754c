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
//! <bpffs>/layout/<N>            the maps' layout version (see [`layout`])
//! ```
//!
//! Every change of an instance holds its write lock, an `flock(2)` on the directory
//! ([`lock`](mod@lock)); reads take nothing.

pub mod attach;
mod clsact;
pub mod cpus;
mod filter_words;
mod flow_cache;
mod jump;
pub mod layout;
pub mod lock;
pub mod maps;

use std::path::{Path, PathBuf};

pub use attach::{
    AttachOutcome, MapSizes, attach, attach_reply, attached_interfaces, detach, detach_reply, purge,
};
pub use lock::{WriteLock, lock, lock_if_attached};
pub use maps::{Engine, EntryView, GlobalStats};

/// Errors of the engine. Messages are for the person at the prompt.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The datapath is not pinned under this bpffs directory (the program or a
    /// map pin is missing).
    #[error(
        "viscum is not attached: no datapath is pinned under {0} (run `viscum attach IFACE` first, or pass the --bpffs used then)"
    )]
    NotAttached(PathBuf),
    /// No interface of this name in the calling thread's network namespace.
    #[error("interface {0} does not exist")]
    UnknownInterface(String),
    /// Not a Linux interface name: empty, over 15 bytes (`IFNAMSIZ` - 1),
    /// or containing `/` or whitespace.
    #[error("'{0}' is not a valid interface name")]
    BadInterfaceName(String),
    /// The classifier has no link (or clsact record) on this interface.
    #[error("viscum is not attached to {0}")]
    NotAttachedTo(String),
    /// An entry with exactly this match exists already; holds the match.
    #[error("an entry for {0} already exists (delete it first to change its target)")]
    Duplicate(String),
    /// No entry has exactly this match; holds the match (and what entries of the same match
    /// for other clients there are, when a caller looked).
    #[error("no entry for {0}")]
    NoSuchEntry(String),
    /// The exact-match map (`VISCUM_SERVICES`, `E2BIG` from the kernel) or the
    /// prefix rules array (`MAX_RULES` slots) is full; holds that capacity in entries.
    #[error("the services map is full ({0} entries); attach with a larger --max-entries")]
    Full(u32),
    /// One address prefix already holds its maximum of port/source rules.
    #[error("{prefix}: an address prefix holds at most {max} rules (port ranges / sources)")]
    PrefixFull {
        /// The match being added.
        prefix: String,
        /// Rules per prefix (`RULES_PER_PREFIX`).
        max: usize,
    },
    /// Another process (a CLI command or the daemon) held the instance's write lock
    /// ([`lock()`]) for longer than [`lock::LOCK_TIMEOUT`].
    #[error(
        "another viscum command or the daemon has been changing the instance in {dir} for {waited:?}; \
         nothing was changed (try again when it is done)"
    )]
    Busy {
        /// The pin directory whose lock was wanted.
        dir: PathBuf,
        /// How long this process waited.
        waited: std::time::Duration,
    },
    /// The pins were written by a Viscum whose pinned maps have another layout
    /// ([`viscum_common::MAP_LAYOUT_VERSION`]) that this binary cannot migrate.
    #[error(
        "the pins in {dir} were written by {writer} (map layout {found}; this viscum uses layout \
         {want}){detail}: this viscum will not use them. To start over with this viscum (every \
         entry is lost; a daemon re-adds its configured ones): run `viscum detach --all --purge \
         --bpffs {dir}`, then `viscum attach IFACE...` again (or restart `viscum run`)"
    )]
    Layout {
        /// The pin directory.
        dir: PathBuf,
        /// The layout version found (1 for pins without a marker).
        found: u32,
        /// This binary's [`viscum_common::MAP_LAYOUT_VERSION`].
        want: u32,
        /// "an older viscum" or "a newer viscum".
        writer: &'static str,
        /// The maps whose key/value sizes differ, as `: VISCUM_FLOWS value 40 bytes (expected
        /// 48), ...`; empty when only the marker says so.
        detail: String,
    },
    /// The pins are of an older layout that `viscum attach` migrates (dropping the soft
    /// state named: flow records, counters, the miss pre-filter, rebuilt from the entries);
    /// other commands refuse until it has.
    #[error(
        "the pins in {dir} are of an older map layout ({from}; this viscum uses {want}): run \
         `viscum attach IFACE...` (or restart `viscum run`) to migrate them — entries are kept, \
         the soft state in {maps} (flow records, counters, the miss pre-filter) is dropped and \
         rebuilt"
    )]
    NeedsMigration {
        /// The pin directory.
        dir: PathBuf,
        /// The layout version found.
        from: u32,
        /// This binary's [`viscum_common::MAP_LAYOUT_VERSION`].
        want: u32,
        /// The soft-state maps a migration re-creates, comma-separated.
        maps: String,
    },
    /// The bpffs directory for the pins is unusable.
    #[error(transparent)]
    Bpffs(#[from] crate::bpffs::BpffsError),
    /// aya could not load the object: parsing it, BTF, or creating or reusing
    /// its pinned maps (before any program reaches the verifier).
    #[error("cannot load the classifier into the kernel")]
    Load(#[source] Box<aya::EbpfError>),
    /// `BPF_PROG_LOAD` failed: the verifier (or the kernel) refused a program.
    #[error(
        "kernel {kernel} rejected the classifier {program}: {source}\n  verifier, last lines:\n  {verifier_tail}"
    )]
    Rejected {
        /// The program's name in the object (`viscum_ingress`, ...).
        program: String,
        /// The running kernel's release (`uname -r`).
        kernel: String,
        /// The errno of `bpf(BPF_PROG_LOAD)` (`EACCES`, `EINVAL`, ...).
        #[source]
        source: std::io::Error,
        /// The last non-empty lines (at most 16) of the verifier log, joined with
        /// a newline and two spaces.
        verifier_tail: String,
    },
    /// The embedded object cannot run on this machine at all.
    #[error("{0}")]
    Unsupported(String),
    /// A program operation (load, attach, detach, query, open a pin) failed
    /// other than a verifier rejection.
    #[error("{what}")]
    Program {
        /// What was being done, as a sentence fragment naming the object.
        what: String,
        /// aya's error.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// A map operation (open, read, write, delete) failed.
    #[error("{what}")]
    Map {
        /// What was being done, naming the map or the entry.
        what: String,
        /// aya's error.
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// Any other failure: pin and record files under the bpffs directory,
    /// netlink for a clsact qdisc, the embedded object lacking a program.
    #[error("{what}")]
    Io {
        /// What was being done, naming the path, interface or object.
        what: String,
        /// The underlying error.
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

/// Paths of the pins under one bpffs directory (layout in the [module docs](self)).
/// Only computes paths: nothing is created or checked.
#[derive(Clone, Debug)]
pub struct Pins {
    /// The instance's bpffs directory (the CLI's `--bpffs`).
    pub dir: PathBuf,
}

impl Pins {
    /// The pins of the instance in `dir`; `dir` is taken as given.
    pub fn new(dir: impl AsRef<Path>) -> Self {
        Pins {
            dir: dir.as_ref().to_owned(),
        }
    }
    /// `<dir>/prog_ingress`: the TC-ingress classifier.
    pub fn program(&self) -> PathBuf {
        self.dir.join("prog_ingress")
    }
    /// `<dir>/<name>`: a map pinned by its name (`VISCUM_SERVICES`, ...).
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    /// `<dir>/prog_reply`: the reply-path classifier of the service veths.
    pub fn reply_program(&self) -> PathBuf {
        self.dir.join("prog_reply")
    }
    /// The ICMP programs the classifiers tail-call into.
    pub fn icmp_ingress_program(&self) -> PathBuf {
        self.dir.join("prog_icmp_ingress")
    }
    /// `<dir>/prog_recover`: the flow-recovery program (tail-called by the classifier).
    pub fn recover_program(&self) -> PathBuf {
        self.dir.join("prog_recover")
    }
    /// `<dir>/prog_icmp_reply`: the reply path's ICMP-error program.
    pub fn icmp_reply_program(&self) -> PathBuf {
        self.dir.join("prog_icmp_reply")
    }
    /// Every program pin of the instance.
    pub fn program_pins(&self) -> [PathBuf; 5] {
        [
            self.program(),
            self.reply_program(),
            self.icmp_ingress_program(),
            self.icmp_reply_program(),
            self.recover_program(),
        ]
    }
    /// `<dir>/reply-links`: the reply program's links, one per service veth.
    pub fn reply_links_dir(&self) -> PathBuf {
        self.dir.join("reply-links")
    }
    /// `<dir>/reply-links/<ifname>`: the TCX link on service veth `ifname`.
    pub fn reply_link(&self, ifname: &str) -> PathBuf {
        self.reply_links_dir().join(ifname)
    }
    /// `<dir>/links`: one entry per client-facing interface the classifier is on.
    pub fn links_dir(&self) -> PathBuf {
        self.dir.join("links")
    }
    /// `<dir>/links/<ifname>`: the TCX link on `ifname`, or with clsact a record
    /// directory (`ifindex-N`, and `clsact-created` when Viscum added the qdisc).
    pub fn link(&self, ifname: &str) -> PathBuf {
        self.links_dir().join(ifname)
    }
}

/// Interface index by name, in the calling thread's network namespace.
///
/// # Errors
/// [`EngineError::BadInterfaceName`] for a name Linux cannot have;
/// [`EngineError::UnknownInterface`] when `if_nametoindex(3)` finds none.
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

/// The name interface index `ifindex` has in the calling thread's network namespace
/// (if_indextoname(3)), or `None` when there is no such interface (or `ifindex` is 0).
///
/// (Not through `nix::net::if_::if_indextoname`: nix 0.31 takes the NULL that
/// if_indextoname(3) returns on failure for success, and answers `Ok("")` for any index.)
pub fn interface_name(ifindex: u32) -> Option<String> {
    if ifindex == 0 {
        return None;
    }
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname(3) requires; on success
    // it holds a NUL-terminated name.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    // SAFETY: NUL-terminated within the buffer (see above).
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}
