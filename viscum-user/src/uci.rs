//! OpenWrt's UCI configuration (`/etc/config/viscum`) mapped onto the daemon's TOML
//! configuration ([`crate::config`]), for `viscum config from-uci` and the OpenWrt init script.
//!
//! OpenWrt keeps every service's settings in UCI files that LuCI and `uci set` edit; the daemon
//! reads TOML. The init script runs `viscum config from-uci /etc/config/viscum -o FILE`, then
//! `viscum run --check -c FILE`, then starts `viscum run -c FILE` under procd, so the mapping
//! lives here, in Rust, where it is unit tested, and not in shell.
//!
//! # The file
//!
//! ```text
//! config engine 'engine'
//!     option enabled '1'
//!     list interface 'br-lan'
//!     option metrics '127.0.0.1:9310'
//!
//! config service 'speedtest'
//!     list match 'tcp://198.51.100.7:5201'
//!     list match 'udp://198.51.100.7:5201'
//!     list command 'iperf3'
//!     list command '-s'
//!     option health_tcp '5201'
//!     option limit_memory '64M'
//! ```
//!
//! One `engine` section (optional) and any number of `service` sections; the mapping of every
//! option is in [`ENGINE_OPTIONS`] and [`SERVICE_OPTIONS`] and in `docs/openwrt.md`. A service
//! is named by its section name (UCI section names allow `A-Z a-z 0-9 _`) or by
//! `option name`, which it needs when the section is anonymous or the name has a `-`.
//! `option enabled '0'` leaves a service out (and on the engine section, the init script does
//! not start the daemon).
//!
//! # Syntax
//!
//! The parser follows libuci's (`file.c`): statements `package NAME`, `config TYPE [NAME]`,
//! `option NAME VALUE` and `list NAME VALUE`, separated by newlines or `;`; a word is any mix
//! of unquoted text (a backslash escapes the next character, a backslash at the end of a line
//! continues it), `'single quoted'` text (no escapes) and `"double quoted"` text (backslash
//! escapes), and quoted text may span lines; `#` outside quotes starts a comment. It is
//! stricter than libuci where libuci silently picks one of two meanings: an option given twice,
//! an `option` and a `list` of the same name, two sections of the same name, unknown section
//! types and unknown options are errors. Every error names the file's line, and every problem
//! of the mapping names the UCI section and option in UCI's own notation
//! (`viscum.speedtest.health_tcp`, `viscum.@service[1].match`).

use std::{collections::BTreeMap, fmt, path::Path};

use crate::config::{Config, ConfigError, Problem};

/// Why a UCI file was refused.
#[derive(Debug, thiserror::Error)]
pub enum UciError {
    /// The file could not be read ([`UciFile::load`]).
    #[error("cannot read {path}")]
    Read {
        /// The file's path.
        path: String,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// Not UCI syntax; `line` is 1-based.
    #[error("{origin}: line {line}: {message}")]
    Syntax {
        /// The file's path, or `configuration` for [`UciFile::parse`].
        origin: String,
        /// 1-based line of the problem.
        line: usize,
        /// What is wrong there.
        message: String,
    },
    /// Valid syntax, but options that do not map or values the configuration refuses. Each
    /// problem is one line naming the section, the option and its line.
    #[error("{origin}: {} problem{}:\n  {}", problems.len(), if problems.len() == 1 { "" } else { "s" },
        problems.join("\n  "))]
    Invalid {
        /// The origin given to [`to_config`] (the file's path).
        origin: String,
        /// Every problem, one line each (`viscum.speedtest.health_tcp (line 9): ...`).
        problems: Vec<String>,
    },
}

/// One parsed UCI file: its sections in file order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UciFile {
    /// The package name: from a `package` statement, else the file name (`viscum`).
    pub package: String,
    /// Every `config` section, in file order.
    pub sections: Vec<Section>,
}

/// `config TYPE ['NAME']` and its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// The section type (`engine`, `service`).
    pub kind: String,
    /// `None` for an anonymous section.
    pub name: Option<String>,
    /// Index among the sections of the same type (UCI's `@service[1]`).
    pub index: usize,
    /// 1-based line of the `config` statement.
    pub line: usize,
    /// Its options and lists, in order of first appearance.
    pub options: Vec<UciOption>,
}

/// `option NAME VALUE` or the `list NAME VALUE` statements of one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UciOption {
    /// The option's name (`A-Z a-z 0-9 _`).
    pub name: String,
    /// Its value: single for `option`, a list for `list`.
    pub value: UciValue,
    /// 1-based line of the (first) statement.
    pub line: usize,
}

/// An option's value: one string, or a list (with each item's line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UciValue {
    /// `option NAME VALUE`: the value, quotes and escapes resolved.
    Single(String),
    /// `list NAME VALUE` statements: each value with its 1-based line, in file order.
    List(Vec<(String, usize)>),
}

impl UciValue {
    /// The items: one for an option, each item of a list.
    pub fn items(&self) -> Vec<&str> {
        match self {
            UciValue::Single(s) => vec![s.as_str()],
            UciValue::List(l) => l.iter().map(|(s, _)| s.as_str()).collect(),
        }
    }
}

impl Section {
    /// UCI's name for the section: `viscum.speedtest`, or `viscum.@service[0]` if anonymous.
    pub fn path(&self, package: &str) -> String {
        match &self.name {
            Some(n) => format!("{package}.{n}"),
            None => format!("{package}.@{}[{}]", self.kind, self.index),
        }
    }

    /// The option called `name`, if the section has it.
    pub fn get(&self, name: &str) -> Option<&UciOption> {
        self.options.iter().find(|o| o.name == name)
    }
}

/// A name UCI accepts for types, sections and options.
fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

// ---------------------------------------------------------------------------------------------
// Lexing: a statement is a list of words with the line each started on.

struct Lexer<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    line: usize,
    origin: &'a str,
}

impl Lexer<'_> {
    fn error(&self, line: usize, message: impl Into<String>) -> UciError {
        UciError::Syntax {
            origin: self.origin.to_owned(),
            line,
            message: message.into(),
        }
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next();
        if c == Some('\n') {
            self.line += 1;
        }
        c
    }

    /// The next statement's words (empty at the end of the file).
    fn statement(&mut self) -> Result<Vec<(String, usize)>, UciError> {
        let mut words = Vec::new();
        loop {
            // Blanks between words; a statement ends at a newline or `;`.
            match self.chars.peek().copied() {
                None => return Ok(words),
                Some('\n' | ';') => {
                    self.bump();
                    if words.is_empty() {
                        continue;
                    }
                    return Ok(words);
                }
                Some('#') => {
                    while let Some(&c) = self.chars.peek() {
                        if c == '\n' {
                            break;
                        }
                        self.bump();
                    }
                }
                Some(c) if c.is_whitespace() => {
                    self.bump();
                }
                Some('\\') => {
                    // A backslash before the newline continues the statement.
                    let line = self.line;
                    self.bump();
                    if self.chars.peek() == Some(&'\n') {
                        self.bump();
                    } else {
                        let w = self.word(true, line)?;
                        words.push((w, line));
                    }
                }
                Some(_) => {
                    let line = self.line;
                    let w = self.word(false, line)?;
                    words.push((w, line));
                }
            }
        }
    }

    /// One word: unquoted, quoted and escaped parts until a blank, `;`, `#` or the end.
    /// `after_backslash`: the caller consumed a backslash that escapes the first character.
    fn word(&mut self, after_backslash: bool, line: usize) -> Result<String, UciError> {
        let mut out = String::new();
        if after_backslash {
            match self.bump() {
                Some(c) => out.push(c),
                None => return Err(self.error(line, "backslash at the end of the file")),
            }
        }
        while let Some(&c) = self.chars.peek() {
            match c {
                // Single quotes take everything literally; double quotes also take
                // backslash escapes (libuci's rules), a backslash-newline being a continuation.
                quote @ ('\'' | '"') => {
                    let start = self.line;
                    self.bump();
                    let unterminated = if quote == '"' {
                        "unterminated \""
                    } else {
                        "unterminated '"
                    };
                    loop {
                        match self.bump() {
                            Some(c) if c == quote => break,
                            Some('\\') if quote == '"' => match self.bump() {
                                Some('\n') => {}
                                Some(c) => out.push(c),
                                None => return Err(self.error(start, unterminated)),
                            },
                            Some(c) => out.push(c),
                            None => return Err(self.error(start, unterminated)),
                        }
                    }
                }
                '\\' => {
                    self.bump();
                    match self.bump() {
                        Some('\n') => {}
                        Some(c) => out.push(c),
                        None => {
                            return Err(self.error(self.line, "backslash at the end of the file"));
                        }
                    }
                }
                '#' | ';' => break,
                c if c.is_whitespace() => break,
                c => {
                    self.bump();
                    out.push(c);
                }
            }
        }
        Ok(out)
    }
}

impl UciFile {
    /// Reads and parses a UCI file; the package defaults to the file name.
    ///
    /// # Errors
    /// [`UciError::Read`] if the file cannot be read; otherwise as [`UciFile::parse`].
    pub fn load(path: &Path) -> Result<UciFile, UciError> {
        let text = std::fs::read_to_string(path).map_err(|source| UciError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let package = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "viscum".into());
        UciFile::parse_named(&text, &path.display().to_string(), &package)
    }

    /// Parses UCI text (package `viscum`, errors say `configuration`).
    ///
    /// # Errors
    /// [`UciError::Syntax`] at the first error, with its line: bad quoting or statement,
    /// invalid names, an option given twice, two sections of one name.
    pub fn parse(text: &str) -> Result<UciFile, UciError> {
        UciFile::parse_named(text, "configuration", "viscum")
    }

    fn parse_named(text: &str, origin: &str, package: &str) -> Result<UciFile, UciError> {
        let mut lx = Lexer {
            chars: text.chars().peekable(),
            line: 1,
            origin,
        };
        let mut file = UciFile {
            package: package.to_owned(),
            sections: Vec::new(),
        };
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        loop {
            let words = lx.statement()?;
            let Some(((keyword, line), args)) = words.split_first() else {
                return Ok(file);
            };
            let line = *line;
            let arity = |min: usize, max: usize, usage: &str| -> Result<(), UciError> {
                if args.len() < min || args.len() > max {
                    Err(lx.error(
                        line,
                        format!("'{keyword}' takes {usage} ({} given)", args.len()),
                    ))
                } else {
                    Ok(())
                }
            };
            match keyword.as_str() {
                "package" => {
                    arity(1, 1, "a name")?;
                    if !file.sections.is_empty() {
                        return Err(lx.error(line, "'package' must come before any 'config'"));
                    }
                    file.package = args[0].0.clone();
                }
                "config" => {
                    arity(1, 2, "a type and an optional name")?;
                    let kind = &args[0].0;
                    if !valid_name(kind) {
                        return Err(lx.error(
                            line,
                            format!("section type '{kind}' may only have A-Z a-z 0-9 _"),
                        ));
                    }
                    let name = args.get(1).map(|(n, _)| n.clone());
                    if let Some(n) = &name {
                        if !valid_name(n) {
                            return Err(lx.error(
                                line,
                                format!("section name '{n}' may only have A-Z a-z 0-9 _"),
                            ));
                        }
                        if let Some(other) = file
                            .sections
                            .iter()
                            .find(|s| s.name.as_deref() == Some(n.as_str()))
                        {
                            return Err(lx.error(
                                line,
                                format!(
                                    "a second section named '{n}' (the first is on line {})",
                                    other.line
                                ),
                            ));
                        }
                    }
                    let count = counts.entry(kind.clone()).or_default();
                    file.sections.push(Section {
                        kind: kind.clone(),
                        name,
                        index: *count,
                        line,
                        options: Vec::new(),
                    });
                    *count += 1;
                }
                "option" | "list" => {
                    arity(2, 2, "a name and a value")?;
                    let (name, value) = (&args[0].0, &args[1].0);
                    let Some(section) = file.sections.last_mut() else {
                        return Err(lx.error(line, format!("'{keyword}' before any 'config'")));
                    };
                    if !valid_name(name) {
                        return Err(lx.error(
                            line,
                            format!("option name '{name}' may only have A-Z a-z 0-9 _"),
                        ));
                    }
                    let existing = section.options.iter_mut().find(|o| &o.name == name);
                    match (keyword.as_str(), existing) {
                        (_, None) if keyword == "option" => section.options.push(UciOption {
                            name: name.clone(),
                            value: UciValue::Single(value.clone()),
                            line,
                        }),
                        (_, None) => section.options.push(UciOption {
                            name: name.clone(),
                            value: UciValue::List(vec![(value.clone(), line)]),
                            line,
                        }),
                        (
                            "list",
                            Some(UciOption {
                                value: UciValue::List(items),
                                ..
                            }),
                        ) => items.push((value.clone(), line)),
                        (_, Some(first)) => {
                            let what = match first.value {
                                UciValue::Single(_) => "option",
                                UciValue::List(_) => "list",
                            };
                            return Err(lx.error(
                                line,
                                format!(
                                    "'{name}' is already given on line {} (as {what}): give an option once, or use only 'list' lines",
                                    first.line
                                ),
                            ));
                        }
                    }
                }
                other => {
                    return Err(lx.error(
                        line,
                        format!("'{other}' is not a statement (package, config, option, list)"),
                    ));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The mapping.

/// How a UCI value becomes a TOML value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A string, as is.
    Text,
    /// A whole number.
    Integer,
    /// A number (`0.5`).
    Float,
    /// A list of strings: `list` lines, or one `option` split at blanks.
    Words,
    /// `list` lines of `KEY=VALUE`, a TOML table.
    Env,
    /// UCI's booleans (1/0, yes/no, on/off, true/false, enabled/disabled); not written to TOML.
    Bool,
    /// A UCI boolean written as a TOML boolean.
    Flag,
    /// Used by the mapping itself, not written as a key (a service's `name`).
    Name,
}

/// One UCI option and where it goes: a dotted TOML path under its section (`health.tcp`), or
/// `None` for options the mapping consumes itself (`enabled`, `name`).
pub struct OptionMap {
    /// The UCI option name (`health_tcp`).
    pub uci: &'static str,
    /// Its TOML key under the section's table (`health.tcp`), `None` if not written.
    pub toml: Option<&'static str>,
    /// How its value is converted.
    pub kind: Kind,
}

const fn map(uci: &'static str, toml: &'static str, kind: Kind) -> OptionMap {
    OptionMap {
        uci,
        toml: Some(toml),
        kind,
    }
}

/// An option that only the UCI side has (it maps to no TOML key).
const fn uci_only(uci: &'static str, kind: Kind) -> OptionMap {
    OptionMap {
        uci,
        toml: None,
        kind,
    }
}

/// `config engine`: the TOML `[engine]` table.
pub const ENGINE_OPTIONS: &[OptionMap] = &[
    uci_only("enabled", Kind::Bool),
    map("interface", "interfaces", Kind::Words),
    map("bpffs", "bpffs", Kind::Text),
    map("control", "control", Kind::Text),
    map("run_dir", "run_dir", Kind::Text),
    map("max_load", "max_load", Kind::Float),
    map("metrics", "metrics", Kind::Text),
    map("dns", "dns", Kind::Words),
];

/// `config service`: one TOML `[[service]]`.
pub const SERVICE_OPTIONS: &[OptionMap] = &[
    uci_only("enabled", Kind::Bool),
    uci_only("name", Kind::Name),
    map("match", "match", Kind::Words),
    map("command", "command", Kind::Words),
    map("user", "user", Kind::Text),
    map("env", "env", Kind::Env),
    map("restart", "restart", Kind::Text),
    // The redirect mode, named like `viscum redirect add`'s flags.
    map("from", "from", Kind::Text),
    map("nat", "nat", Kind::Flag),
    map("nat_to", "nat_to", Kind::Text),
    map("anyip", "anyip", Kind::Flag),
    map("mirror", "mirror", Kind::Flag),
    map("learn_ms", "learn_ms", Kind::Integer),
    map("stop_grace_ms", "stop_grace_ms", Kind::Integer),
    map("drain_timeout_ms", "drain_timeout_ms", Kind::Integer),
    map("health_tcp", "health.tcp", Kind::Integer),
    map("health_http", "health.http", Kind::Text),
    map("health_port", "health.port", Kind::Integer),
    map("health_exec", "health.exec", Kind::Words),
    map("health_interval_ms", "health.interval_ms", Kind::Integer),
    map("health_timeout_ms", "health.timeout_ms", Kind::Integer),
    map("health_rise", "health.rise", Kind::Integer),
    map("health_fall", "health.fall", Kind::Integer),
    map("limit_memory", "limits.memory", Kind::Text),
    map("limit_cpu", "limits.cpu", Kind::Float),
    map("limit_pids", "limits.pids", Kind::Integer),
];

/// The result of mapping a UCI file: the TOML text, the validated configuration it parses to,
/// and what the init script needs besides.
#[derive(Debug)]
pub struct Mapped {
    /// The TOML configuration, as `viscum run -c` reads it.
    pub toml: String,
    /// `toml`, parsed and validated by [`Config::parse`].
    pub config: Config,
    /// `option enabled` of the engine section (default on).
    pub enabled: bool,
}

impl Mapped {
    /// Seconds procd must wait between SIGTERM and SIGKILL (`term_timeout`) so that a clean
    /// shutdown can finish: services stop in parallel, each draining for up to its
    /// `drain_timeout_ms` and then waiting `stop_grace_ms` for its process, plus
    /// [`SHUTDOWN_MARGIN_S`] for removing namespaces, entries and pins.
    pub fn term_timeout_s(&self) -> u64 {
        let longest = self
            .config
            .services
            .iter()
            .map(|s| s.drain_timeout + s.stop_grace)
            .max()
            .unwrap_or_default();
        longest.as_secs() + u64::from(longest.subsec_nanos() > 0) + SHUTDOWN_MARGIN_S
    }

    /// A fingerprint of the engine settings the daemon cannot change on a reload (`bpffs`,
    /// `run_dir`, `control`, `metrics`): when it changes, the init script restarts the daemon
    /// instead of sending SIGHUP. 16 hex digits.
    pub fn restart_key(&self) -> String {
        let e = &self.config.engine;
        let text = format!(
            "{:?}|{:?}|{:?}|{:?}",
            e.bpffs, e.run_dir, e.control, e.metrics
        );
        // FNV-1a: stable across builds and releases, which a std hasher is not promised to be.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }

    /// Shell variable assignments for the init script and the hotplug script, each value
    /// single-quoted: `VISCUM_ENABLED`, `VISCUM_TERM_TIMEOUT`, `VISCUM_RESTART_KEY`,
    /// `VISCUM_INTERFACES` (space separated device names).
    pub fn shell(&self) -> String {
        let vars = [
            (
                "VISCUM_ENABLED",
                if self.enabled { "1" } else { "0" }.to_owned(),
            ),
            ("VISCUM_TERM_TIMEOUT", self.term_timeout_s().to_string()),
            ("VISCUM_RESTART_KEY", self.restart_key()),
            ("VISCUM_INTERFACES", self.config.engine.interfaces.join(" ")),
        ];
        vars.iter()
            .map(|(k, v)| format!("{k}={}\n", shell_quote(v)))
            .collect()
    }
}

/// Time the daemon gets on top of draining and stopping its services, in seconds.
pub const SHUTDOWN_MARGIN_S: u64 = 5;

/// `'text'` with every `'` written as `'\''`.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Where a problem is: a section's UCI path and, optionally, an option and its line.
struct Place {
    path: String,
    line: usize,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (line {})", self.path, self.line)
    }
}

fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "yes" | "on" | "true" | "enabled" => Some(true),
        "0" | "no" | "off" | "false" | "disabled" => Some(false),
        _ => None,
    }
}

/// Sets `path` (dotted) in `table`, creating the tables on the way.
fn insert(table: &mut toml::Table, path: &str, value: toml::Value) {
    let mut parts = path.split('.').peekable();
    let mut t = table;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            t.insert(part.to_owned(), value);
            return;
        }
        t = t
            .entry(part.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("mapping paths only nest tables");
    }
}

/// Converts one option's value as its [`Kind`] says; problems name the option.
fn convert(
    option: &UciOption,
    kind: Kind,
    place: &str,
    problems: &mut Vec<String>,
) -> Option<toml::Value> {
    let at = |line: usize| Place {
        path: format!("{place}.{}", option.name),
        line,
    };
    let single = |problems: &mut Vec<String>| -> Option<&str> {
        match &option.value {
            UciValue::Single(s) => Some(s.as_str()),
            UciValue::List(_) => {
                problems.push(format!(
                    "{}: is a list; give it as one 'option' line",
                    at(option.line)
                ));
                None
            }
        }
    };
    match kind {
        Kind::Text | Kind::Name => single(problems).map(|s| toml::Value::String(s.to_owned())),
        Kind::Integer => {
            let s = single(problems)?;
            match s.trim().parse::<i64>() {
                Ok(n) => Some(toml::Value::Integer(n)),
                Err(_) => {
                    problems.push(format!("{}: '{s}' is not a whole number", at(option.line)));
                    None
                }
            }
        }
        Kind::Float => {
            let s = single(problems)?;
            match s.trim().parse::<f64>() {
                Ok(x) if x.is_finite() => Some(toml::Value::Float(x)),
                _ => {
                    problems.push(format!(
                        "{}: '{s}' is not a number such as 0.5",
                        at(option.line)
                    ));
                    None
                }
            }
        }
        Kind::Bool | Kind::Flag => {
            let s = single(problems)?;
            match parse_bool(s) {
                Some(b) => Some(toml::Value::Boolean(b)),
                None => {
                    problems.push(format!(
                        "{}: '{s}' is not a boolean (1/0, yes/no, on/off, true/false)",
                        at(option.line)
                    ));
                    None
                }
            }
        }
        Kind::Words => {
            let words: Vec<toml::Value> = match &option.value {
                UciValue::Single(s) => s
                    .split_whitespace()
                    .map(|w| toml::Value::String(w.to_owned()))
                    .collect(),
                UciValue::List(items) => items
                    .iter()
                    .map(|(s, _)| toml::Value::String(s.clone()))
                    .collect(),
            };
            Some(toml::Value::Array(words))
        }
        Kind::Env => {
            let items: Vec<(String, usize)> = match &option.value {
                UciValue::Single(s) => vec![(s.clone(), option.line)],
                UciValue::List(items) => items.clone(),
            };
            let mut table = toml::Table::new();
            let mut ok = true;
            for (item, line) in items {
                match item.split_once('=') {
                    Some((k, v)) if !k.is_empty() => {
                        if table
                            .insert(k.to_owned(), toml::Value::String(v.to_owned()))
                            .is_some()
                        {
                            problems.push(format!("{}: {k} is set twice", at(line)));
                            ok = false;
                        }
                    }
                    _ => {
                        problems.push(format!("{}: '{item}' is not KEY=VALUE", at(line)));
                        ok = false;
                    }
                }
            }
            ok.then_some(toml::Value::Table(table))
        }
    }
}

/// Maps one section's options into `out` (its TOML table); unknown options are problems.
fn map_section(
    section: &Section,
    package: &str,
    options: &[OptionMap],
    out: &mut toml::Table,
    problems: &mut Vec<String>,
) -> bool {
    let place = section.path(package);
    let mut enabled = true;
    for option in &section.options {
        let Some(m) = options.iter().find(|m| m.uci == option.name) else {
            let known: Vec<&str> = options.iter().map(|m| m.uci).collect();
            problems.push(format!(
                "{}: unknown option (known: {})",
                Place {
                    path: format!("{place}.{}", option.name),
                    line: option.line
                },
                known.join(", ")
            ));
            continue;
        };
        let Some(value) = convert(option, m.kind, &place, problems) else {
            continue;
        };
        match m.toml {
            Some(path) => insert(out, path, value),
            None if m.kind == Kind::Bool => enabled = value.as_bool().unwrap_or(true),
            None => {}
        }
    }
    enabled
}

/// For mapping the configuration's problems back: which UCI section each emitted TOML
/// section came from.
struct Origins<'a> {
    package: &'a str,
    engine: Option<&'a Section>,
    /// Emitted services in order, with the name they were given.
    services: Vec<(String, &'a Section)>,
}

impl Origins<'_> {
    /// A configuration problem in UCI terms: `viscum.speedtest.match[1] (line 8): ...`.
    fn translate(&self, p: &Problem) -> String {
        let section = if p.scope == "engine" {
            self.engine
        } else if let Some(name) = p.scope.strip_prefix("service ") {
            match name.strip_prefix('#').and_then(|n| n.parse::<usize>().ok()) {
                Some(n) => self.services.get(n.wrapping_sub(1)).map(|(_, s)| *s),
                None => self
                    .services
                    .iter()
                    .find(|(emitted, _)| emitted == name)
                    .map(|(_, s)| *s),
            }
        } else {
            None
        };
        let Some(section) = section else {
            // Only a schema change can get here (a problem outside any section we wrote).
            return format!("{p} (in the TOML generated from {})", self.package);
        };
        let options = if section.kind == "engine" {
            ENGINE_OPTIONS
        } else {
            SERVICE_OPTIONS
        };
        let place = section.path(self.package);
        // `match[1]` -> (`match`, Some(1)); `env.KEY` -> `env`; `health.tcp` stays whole.
        let (base, index) = match p.field.split_once('[') {
            Some((b, rest)) => (b, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (p.field.as_str(), None),
        };
        let mapped = options.iter().find(|m| match m.toml {
            Some(t) => t == base || (m.kind == Kind::Env && base.starts_with(&format!("{t}."))),
            None => m.kind == Kind::Name && base == "name",
        });
        match mapped.and_then(|m| section.get(m.uci).map(|o| (m, o))) {
            Some((m, option)) => {
                let line = match (&option.value, index) {
                    (UciValue::List(items), Some(i)) => {
                        items.get(i).map_or(option.line, |(_, l)| *l)
                    }
                    _ => option.line,
                };
                let item = match (&option.value, index) {
                    (UciValue::List(_), Some(i)) => format!("[{i}]"),
                    _ => String::new(),
                };
                format!(
                    "{}: {}",
                    Place {
                        path: format!("{place}.{}{item}", m.uci),
                        line
                    },
                    p.message
                )
            }
            // The option is missing (or not one of ours): name the section, and the option
            // to set where there is one.
            None => {
                // A whole table (`health`): its options share a prefix (`health_*`).
                let group = options
                    .iter()
                    .filter_map(|m| m.toml.zip(Some(m.uci)))
                    .find(|(t, _)| !base.is_empty() && t.starts_with(&format!("{base}.")))
                    .and_then(|(_, uci)| uci.split_once('_'))
                    .map(|(prefix, _)| format!(".{prefix}_*"));
                let hint = mapped
                    .map(|m| format!(".{}", m.uci))
                    .or(group.clone())
                    .unwrap_or_default();
                let what = if p.field.is_empty() || mapped.is_some() || group.is_some() {
                    String::new()
                } else {
                    format!("{}: ", p.field)
                };
                format!(
                    "{}: {what}{}",
                    Place {
                        path: format!("{place}{hint}"),
                        line: section.line
                    },
                    p.message
                )
            }
        }
    }
}

/// Maps a parsed UCI file onto the TOML configuration and validates it; every problem (of the
/// mapping and of the configuration) is reported, each naming its UCI section and option.
///
/// # Errors
/// [`UciError::Invalid`] with every problem: unknown sections or options, values that
/// do not convert, and whatever [`Config::parse`] refuses in the result.
///
/// # Panics
/// Only if `toml` cannot serialise a table of strings, numbers and tables (a bug).
pub fn to_config(file: &UciFile, origin: &str) -> Result<Mapped, UciError> {
    let mut problems = Vec::new();
    let package = file.package.as_str();
    let mut root = toml::Table::new();
    let mut engine_enabled = true;
    let mut origins = Origins {
        package,
        engine: None,
        services: Vec::new(),
    };
    let mut services = Vec::new();
    for section in &file.sections {
        match section.kind.as_str() {
            "engine" => {
                if let Some(first) = origins.engine {
                    problems.push(format!(
                        "{}: a second engine section (the first is {} on line {}); merge them",
                        Place {
                            path: section.path(package),
                            line: section.line
                        },
                        first.path(package),
                        first.line
                    ));
                    continue;
                }
                origins.engine = Some(section);
                let mut engine = toml::Table::new();
                engine_enabled =
                    map_section(section, package, ENGINE_OPTIONS, &mut engine, &mut problems);
                root.insert("engine".into(), toml::Value::Table(engine));
            }
            "service" => {
                let mut service = toml::Table::new();
                let enabled = map_section(
                    section,
                    package,
                    SERVICE_OPTIONS,
                    &mut service,
                    &mut problems,
                );
                let name = match section.get("name").map(|o| &o.value) {
                    Some(UciValue::Single(n)) => Some(n.clone()),
                    Some(UciValue::List(_)) => None, // reported by map_section
                    None => section.name.clone(),
                };
                let Some(name) = name else {
                    if section.get("name").is_none() {
                        problems.push(format!(
                            "{}: an anonymous service section needs option name",
                            Place {
                                path: section.path(package),
                                line: section.line
                            }
                        ));
                    }
                    continue;
                };
                if !enabled {
                    continue;
                }
                // `name` first, as a person would write it.
                let mut ordered = toml::Table::new();
                ordered.insert("name".into(), toml::Value::String(name.clone()));
                ordered.extend(service);
                origins.services.push((name, section));
                services.push(toml::Value::Table(ordered));
            }
            other => problems.push(format!(
                "{}: unknown section type '{other}' (expected engine or service)",
                Place {
                    path: section.path(package),
                    line: section.line
                }
            )),
        }
    }
    if !services.is_empty() {
        root.insert("service".into(), toml::Value::Array(services));
    }
    if !problems.is_empty() {
        return Err(UciError::Invalid {
            origin: origin.to_owned(),
            problems,
        });
    }
    let toml = format!(
        "# Generated by `viscum config from-uci` from {origin}: edit that file, not this one.\n\n{}",
        toml::to_string(&root).expect("a table of strings, numbers and tables serializes")
    );
    match Config::parse(&toml) {
        Ok(config) => Ok(Mapped {
            toml,
            config,
            enabled: engine_enabled,
        }),
        Err(ConfigError::Invalid { problems, .. }) => Err(UciError::Invalid {
            origin: origin.to_owned(),
            problems: problems.iter().map(|p| origins.translate(p)).collect(),
        }),
        // We wrote the TOML ourselves: a syntax error is our bug, said as such.
        Err(e) => Err(UciError::Invalid {
            origin: origin.to_owned(),
            problems: vec![format!("the generated TOML does not parse (a bug): {e}")],
        }),
    }
}

/// [`UciFile::load`] then [`to_config`].
///
/// # Errors
/// As [`UciFile::load`], then as [`to_config`].
pub fn load(path: &Path) -> Result<Mapped, UciError> {
    let file = UciFile::load(path)?;
    to_config(&file, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{HealthCheck, RestartPolicy};

    /// The example shipped as dist/openwrt/files/viscum.config: it must always map.
    const SHIPPED: &str = include_str!("../../dist/openwrt/files/viscum.config");

    const FULL: &str = r#"
# A comment line
package viscum

config engine 'engine'
	option enabled '1'
	list interface 'br-lan'
	list interface 'eth1'
	option max_load '0.9'
	option metrics '127.0.0.1:9310'
	list dns '192.0.2.53'
	option control '/var/run/viscum.sock'

config service 'speedtest'
	list match 'tcp://198.51.100.7:5201'
	list match "udp://198.51.100.7:5201"  # trailing comment
	option command 'iperf3 -s -p 5201'
	option user 'nobody'
	list env 'KEY=value'
	list env 'GREETING=it'\''s=ok'
	option restart 'always'
	option stop_grace_ms '2000'
	option drain_timeout_ms '15000'
	option health_tcp '5201'
	option health_interval_ms '500'
	option health_timeout_ms '300'
	option health_rise '3'
	option health_fall '4'
	option limit_memory '64M'
	option limit_cpu '0.5'
	option limit_pids '64'

config service
	option name 'web-edge'
	list match 'tcp://198.51.100.8:80'
	list command 'python3'
	list command '-c'
	list command 'print("a b")'
	option health_http '/healthz'

config service 'off'
	option enabled '0'
	list match 'tcp://198.51.100.9:80'
	list command 'true'
"#;

    fn problems(text: &str) -> Vec<String> {
        match UciFile::parse(text).and_then(|f| to_config(&f, "viscum")) {
            Ok(m) => panic!("expected problems, got:\n{}", m.toml),
            Err(UciError::Invalid { problems, .. }) => problems,
            Err(e) => vec![e.to_string()],
        }
    }

    fn has(problems: &[String], needle: &str) {
        assert!(
            problems.iter().any(|p| p.contains(needle)),
            "no problem containing {needle:?} in {problems:#?}"
        );
    }

    fn syntax(text: &str) -> (usize, String) {
        match UciFile::parse(text) {
            Err(UciError::Syntax { line, message, .. }) => (line, message),
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }

    #[test]
    fn full_file_maps_and_validates() {
        let file = UciFile::parse(FULL).unwrap();
        let m = to_config(&file, "/etc/config/viscum").unwrap();
        let c = &m.config;
        assert!(m.enabled);
        assert_eq!(c.engine.interfaces, ["br-lan", "eth1"]);
        assert_eq!(c.engine.max_load, Some(0.9));
        assert_eq!(c.engine.metrics, Some("127.0.0.1:9310".parse().unwrap()));
        assert_eq!(c.engine.dns, ["192.0.2.53:53".parse().unwrap()]);
        assert_eq!(
            c.engine.control.as_deref(),
            Some(Path::new("/var/run/viscum.sock"))
        );
        assert_eq!(c.services.len(), 2, "the disabled service is left out");
        let s = &c.services[0];
        assert_eq!(s.name, "speedtest");
        assert_eq!(
            s.matches
                .iter()
                .map(std::string::ToString::to_string)
                .collect::<Vec<_>>(),
            ["tcp://198.51.100.7:5201", "udp://198.51.100.7:5201"]
        );
        assert_eq!(s.command, ["iperf3", "-s", "-p", "5201"]);
        assert_eq!(s.env.get("KEY").map(String::as_str), Some("value"));
        assert_eq!(s.env.get("GREETING").map(String::as_str), Some("it's=ok"));
        assert_eq!(s.restart, RestartPolicy::Always);
        assert_eq!(s.stop_grace, Duration::from_secs(2));
        assert_eq!(s.drain_timeout, Duration::from_secs(15));
        assert_eq!(s.health.check, HealthCheck::Tcp { port: 5201 });
        assert_eq!(s.health.interval, Duration::from_millis(500));
        assert_eq!(s.health.timeout, Duration::from_millis(300));
        assert_eq!((s.health.rise, s.health.fall), (3, 4));
        assert_eq!(s.limits.memory, Some(64 << 20));
        assert_eq!(s.limits.cpu, Some(0.5));
        assert_eq!(s.limits.pids, Some(64));
        let w = &c.services[1];
        assert_eq!(w.name, "web-edge");
        assert_eq!(w.command, ["python3", "-c", "print(\"a b\")"]);
        assert_eq!(
            w.health.check,
            HealthCheck::Http {
                path: "/healthz".into(),
                port: 80
            }
        );
        // Draining 15 s + 2 s grace + the margin.
        assert_eq!(m.term_timeout_s(), 17 + SHUTDOWN_MARGIN_S);
        // The TOML we print is what the daemon reads.
        assert_eq!(Config::parse(&m.toml).unwrap(), m.config);
    }

    #[test]
    fn shipped_example_maps() {
        let m = to_config(&UciFile::parse(SHIPPED).unwrap(), "viscum.config").unwrap();
        assert!(!m.config.engine.interfaces.is_empty());
        // Defaults: 10 s drain + 5 s stop grace, plus the margin.
        assert!(
            m.term_timeout_s() >= 15 + SHUTDOWN_MARGIN_S,
            "{}",
            m.term_timeout_s()
        );
    }

    #[test]
    fn defaults_and_empty_file() {
        let m = to_config(&UciFile::parse("").unwrap(), "x").unwrap();
        assert!(m.enabled);
        assert!(m.config.services.is_empty());
        assert_eq!(m.term_timeout_s(), SHUTDOWN_MARGIN_S);
        let m = to_config(
            &UciFile::parse("config engine\n\toption enabled 'no'\n").unwrap(),
            "x",
        )
        .unwrap();
        assert!(!m.enabled);
    }

    #[test]
    fn shell_output_is_quoted_and_keyed() {
        let m = to_config(&UciFile::parse(FULL).unwrap(), "x").unwrap();
        let sh = m.shell();
        assert!(sh.contains("VISCUM_ENABLED='1'\n"), "{sh}");
        assert!(sh.contains("VISCUM_TERM_TIMEOUT='22'\n"), "{sh}");
        assert!(sh.contains("VISCUM_INTERFACES='br-lan eth1'\n"), "{sh}");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        // The restart key follows exactly the settings a reload cannot change.
        let other = FULL.replace("127.0.0.1:9310", "127.0.0.1:9311");
        let m2 = to_config(&UciFile::parse(&other).unwrap(), "x").unwrap();
        assert_ne!(m.restart_key(), m2.restart_key());
        let other = FULL.replace("option health_rise '3'", "option health_rise '5'");
        let m3 = to_config(&UciFile::parse(&other).unwrap(), "x").unwrap();
        assert_eq!(m.restart_key(), m3.restart_key());
        assert_eq!(m.restart_key().len(), 16);
    }

    #[test]
    fn lexer_follows_libuci() {
        let f = UciFile::parse(
            "config service a; option command \"say \\\"hi\\\"\" ; list match x\\ y\n\
             option user 'multi\nline'\n\
             option health_http \\\n  '/p'#c\n",
        )
        .unwrap();
        let s = &f.sections[0];
        assert_eq!(s.name.as_deref(), Some("a"));
        assert_eq!(s.get("command").unwrap().value.items(), ["say \"hi\""]);
        assert_eq!(s.get("match").unwrap().value.items(), ["x y"]);
        assert_eq!(s.get("user").unwrap().value.items(), ["multi\nline"]);
        let http = s.get("health_http").unwrap();
        assert_eq!(http.value.items(), ["/p"]);
        assert_eq!(http.line, 4);
        // Sections of one type are numbered for UCI's @type[i] notation.
        let f = UciFile::parse("config service\nconfig engine\nconfig service b\n").unwrap();
        assert_eq!(f.sections[2].path("viscum"), "viscum.b");
        assert_eq!(f.sections[0].path("viscum"), "viscum.@service[0]");
        assert_eq!(f.sections[2].index, 1);
    }

    #[test]
    fn syntax_errors_name_the_line() {
        assert_eq!(syntax("config service a\n\toption user 'nobody\n").0, 2);
        assert!(
            syntax("config service a\n\toption user 'nobody\n")
                .1
                .contains("unterminated '")
        );
        let (line, msg) = syntax("\n\noption user x\n");
        assert_eq!(line, 3);
        assert!(msg.contains("before any 'config'"), "{msg}");
        let (line, msg) = syntax("config service a\n  option user\n");
        assert_eq!(line, 2);
        assert!(msg.contains("takes a name and a value (1 given)"), "{msg}");
        let (line, msg) = syntax("config service a\noption user x\noption user y\n");
        assert_eq!(line, 3);
        assert!(msg.contains("already given on line 2"), "{msg}");
        let (_, msg) = syntax("config service a\nlist match x\noption match y\n");
        assert!(msg.contains("already given on line 2 (as list)"), "{msg}");
        let (line, msg) = syntax("config service a\nconfig service a\n");
        assert_eq!(line, 2);
        assert!(msg.contains("second section named 'a'"), "{msg}");
        let (_, msg) = syntax("config service web-edge\n");
        assert!(msg.contains("may only have A-Z a-z 0-9 _"), "{msg}");
        let (line, msg) = syntax("config service a\n\tvalue x y\n");
        assert_eq!(line, 2);
        assert!(msg.contains("'value' is not a statement"), "{msg}");
        assert_eq!(syntax("config service \"a\n\n").0, 1);
    }

    #[test]
    fn mapping_problems_name_section_and_option() {
        let p = problems(
            "config engine 'main'\n\
             \toption max_load 'lots'\n\
             \toption colour 'blue'\n\
             config service 'a'\n\
             \tlist match 'tcp://198.51.100.7:80'\n\
             \tlist command 'x'\n\
             \toption health_tcp 'eighty'\n\
             \tlist user 'a'\n\
             \tlist env 'NOEQUALS'\n\
             \toption enabled 'maybe'\n\
             config service\n\
             \tlist match 'tcp://198.51.100.7:81'\n\
             config forwarding 'f'\n\
             config engine 'second'\n",
        );
        has(&p, "viscum.main.max_load (line 2): 'lots' is not a number");
        has(
            &p,
            "viscum.main.colour (line 3): unknown option (known: enabled, interface",
        );
        has(
            &p,
            "viscum.a.health_tcp (line 7): 'eighty' is not a whole number",
        );
        has(
            &p,
            "viscum.a.user (line 8): is a list; give it as one 'option' line",
        );
        has(&p, "viscum.a.env (line 9): 'NOEQUALS' is not KEY=VALUE");
        has(&p, "viscum.a.enabled (line 10): 'maybe' is not a boolean");
        has(
            &p,
            "viscum.@service[1] (line 11): an anonymous service section needs option name",
        );
        has(&p, "viscum.f (line 13): unknown section type 'forwarding'");
        has(
            &p,
            "viscum.second (line 14): a second engine section (the first is viscum.main on line 1)",
        );
        assert_eq!(p.len(), 9, "{p:#?}");
    }

    #[test]
    fn config_problems_come_back_in_uci_terms() {
        let p = problems(
            "config engine 'engine'\n\
             \tlist interface 'br-lan'\n\
             \tlist interface 'br-lan'\n\
             \toption metrics 'nope'\n\
             config service 'speedtest'\n\
             \tlist match 'tcp://198.51.100.7:5201'\n\
             \tlist match 'udp://198.51.100.7:70000'\n\
             \toption command 'iperf3 -s'\n\
             \toption health_interval_ms '0'\n\
             \toption limit_memory '64Q'\n\
             \toption user 'no-such-user-here'\n\
             config service 'dns'\n\
             \tlist match 'udp://198.51.100.7:53'\n\
             \tlist command 'x'\n\
             config service 'nocmd'\n\
             \tlist match 'tcp://198.51.100.7:5201'\n\
             config service\n\
             \toption name 'Bad Name'\n\
             \tlist match 'tcp://198.51.100.8:80'\n\
             \tlist command 'x'\n",
        );
        has(
            &p,
            "viscum.engine.interface[1] (line 3): br-lan is listed twice",
        );
        has(
            &p,
            "viscum.engine.metrics (line 4): 'nope' is not an ADDRESS:PORT",
        );
        has(
            &p,
            "viscum.speedtest.match[1] (line 7): port '70000' is not a number between 1 and 65535",
        );
        has(
            &p,
            "viscum.speedtest.health_interval_ms (line 9): 0 must be at least 1",
        );
        has(
            &p,
            "viscum.speedtest.limit_memory (line 10): '64Q' is not a size",
        );
        has(
            &p,
            "viscum.speedtest.user (line 11): unknown user 'no-such-user-here'",
        );
        // A missing option names the section and the option to set.
        has(
            &p,
            "viscum.dns.health_* (line 12): missing: no tcp match with a port",
        );
        has(&p, "viscum.nocmd.command (line 15): missing");
        has(
            &p,
            "viscum.nocmd.match[0] (line 16): tcp://198.51.100.7:5201 is already matched by service speedtest",
        );
        has(
            &p,
            "viscum.@service[3].name (line 18): namespace name 'Bad Name' is invalid",
        );
        assert!(p.iter().all(|x| x.starts_with("viscum.")), "{p:#?}");
    }

    #[test]
    fn redirect_modes() {
        let svc = |extra: &str| {
            format!(
                "config service 'm'\n\tlist match 'tcp://198.51.100.7:80'\n\tlist command 'x'\n{extra}"
            )
        };
        for extra in [
            "\toption anyip '1'\n\toption from '192.0.2.0/24'\n\toption learn_ms '500'\n",
            "\toption mirror 'yes'\n",
            "\toption nat 'on'\n",
            "\toption nat_to '169.254.128.2:8080'\n",
            "\toption anyip '0'\n",
        ] {
            let m = to_config(&UciFile::parse(&svc(extra)).unwrap(), "x")
                .unwrap_or_else(|e| panic!("{extra}: {e}"));
            // The same TOML keys the daemon reads; the generated TOML says so literally.
            let key = extra.trim().split([' ', '\t']).nth(1).unwrap();
            assert!(
                m.toml.contains(&format!("{key} = ")),
                "{key} not in\n{}",
                m.toml
            );
        }
        let p = problems(&svc(
            "\toption anyip '1'\n\toption mirror '1'\n\toption from 'nope'\n\toption learn_ms 'soon'\n\toption nat 'perhaps'\n",
        ));
        has(
            &p,
            "viscum.m.learn_ms (line 7): 'soon' is not a whole number",
        );
        has(&p, "viscum.m.nat (line 8): 'perhaps' is not a boolean");
        assert_eq!(p.len(), 2, "{p:#?}");
        let p = problems(&svc(
            "\toption anyip '1'\n\toption mirror '1'\n\toption from 'nope'\n\toption nat_to 'x:y:z'\n",
        ));
        has(&p, "viscum.m.from (line 6): ");
        has(&p, "viscum.m.nat_to (line 7): ");
        assert!(p.iter().all(|x| x.starts_with("viscum.m")), "{p:#?}");
    }

    #[test]
    fn empty_match_and_bad_restart_policy() {
        let p = problems(
            "config service 'a'\n\tlist command 'x'\n\toption match ''\n\toption restart 'sometimes'\n",
        );
        has(&p, "viscum.a.match (line 3): empty");
        has(
            &p,
            "viscum.a.restart (line 4): 'sometimes' is not one of always, on-failure, never",
        );
    }

    #[test]
    fn every_mapped_key_is_known_to_the_configuration() {
        // One service that sets every option (health kinds are exclusive: exec here, the
        // others in the tests above), so a renamed or removed TOML key fails here loudly.
        let m = to_config(
            &UciFile::parse(
                "config engine\n\
                 \toption enabled 1\n\
                 \tlist interface eth0\n\
                 \toption bpffs /sys/fs/bpf/v2\n\
                 \toption control /run/v2.sock\n\
                 \toption run_dir /run/v2\n\
                 \toption max_load 0.8\n\
                 \toption metrics 127.0.0.1:9999\n\
                 \tlist dns 192.0.2.1\n\
                 config service s\n\
                 \toption enabled on\n\
                 \toption name s2\n\
                 \tlist match tcp://198.51.100.7:80\n\
                 \tlist command x\n\
                 \toption user nobody\n\
                 \tlist env A=b\n\
                 \toption restart never\n\
                 \toption stop_grace_ms 1\n\
                 \toption drain_timeout_ms 0\n\
                 \tlist health_exec true\n\
                 \toption health_interval_ms 100\n\
                 \toption health_timeout_ms 50\n\
                 \toption health_rise 1\n\
                 \toption health_fall 1\n\
                 \toption limit_memory 1M\n\
                 \toption limit_cpu 1\n\
                 \toption limit_pids 5\n",
            )
            .unwrap(),
            "x",
        )
        .unwrap();
        let c = &m.config;
        assert_eq!(c.engine.bpffs.as_deref(), Some(Path::new("/sys/fs/bpf/v2")));
        assert_eq!(c.engine.run_dir.as_deref(), Some(Path::new("/run/v2")));
        assert_eq!(c.services[0].name, "s2");
        assert_eq!(
            c.services[0].health.check,
            HealthCheck::Exec {
                command: vec!["true".into()]
            }
        );
        let used: Vec<&str> = ENGINE_OPTIONS
            .iter()
            .chain(SERVICE_OPTIONS)
            .map(|m| m.uci)
            .collect();
        for name in used {
            assert!(
                name == "health_tcp"
                    || name == "health_http"
                    || name == "health_port"
                    || "enabled interface bpffs control run_dir max_load metrics dns name match command user env restart from learn_ms nat nat_to anyip mirror stop_grace_ms drain_timeout_ms health_exec health_interval_ms health_timeout_ms health_rise health_fall limit_memory limit_cpu limit_pids"
                        .split(' ')
                        .any(|n| n == name),
                "option {name} is not exercised by this test"
            );
        }
        // health_port with health_http.
        let m = to_config(
            &UciFile::parse(
                "config service h\n\tlist match udp://198.51.100.7:53\n\tlist command x\n\toption health_http /\n\toption health_port 8080\n",
            )
            .unwrap(),
            "x",
        )
        .unwrap();
        assert_eq!(
            m.config.services[0].health.check,
            HealthCheck::Http {
                path: "/".into(),
                port: 8080
            }
        );
    }
}
