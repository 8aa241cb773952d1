//! The actions a step can use: their inputs, outputs, and how each is undone.
//!
//! The catalog is data the validator, the JSON Schema and the documentation
//! share; the executor (in `ferry-orchestrator`) implements each action.

/// The type of an input, checked on literal values at validation time and on
/// rendered values when the step starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    String,
    Integer,
    Bool,
    /// `500ms`, `30s`, `5m`, `2h`, or a number of seconds.
    Duration,
    /// A list of strings.
    List,
    /// A mapping of strings to strings.
    Map,
    /// Anything (a string, number, list or map).
    Any,
}

impl Ty {
    pub fn name(self) -> &'static str {
        match self {
            Ty::String => "string",
            Ty::Integer => "integer",
            Ty::Bool => "boolean",
            Ty::Duration => "duration",
            Ty::List => "list",
            Ty::Map => "map",
            Ty::Any => "any",
        }
    }
}

#[derive(Debug)]
pub struct Input {
    pub name: &'static str,
    pub ty: Ty,
    pub required: bool,
    pub doc: &'static str,
    /// What a value must look like beyond its type, checked on literal
    /// values at validation time and on rendered values when the step runs.
    pub format: Format,
}

/// The shape of a value beyond its [`Ty`]: one pure check that validation,
/// the JSON Schema and the executor's typed parsing share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Any value of the type.
    Free,
    /// One of these words (compared without regard to case).
    OneOf(&'static [&'static str]),
    /// `PROTO:PORT` with PROTO `http`, `tcp` or `udp` (each item of a list).
    Listener,
    /// `PROTO:PORT[/PATH]` with PROTO `http`, `https` or `tcp`: what a
    /// health check probes.
    Probe,
    /// An RFC 3339 time (`2025-01-31T12:00:00Z`) or `latest`.
    Time,
    /// A mapping with these keys only.
    Keys(&'static [Key]),
}

/// One key of a [`Format::Keys`] mapping.
#[derive(Debug, PartialEq, Eq)]
pub struct Key {
    pub name: &'static str,
    pub required: bool,
    pub format: Format,
    pub doc: &'static str,
}

/// How the inputs of one action go together, checked at validation time
/// (on which inputs are written) and again on the rendered inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Exactly one of these inputs is given.
    ExactlyOne(&'static [&'static str]),
    /// When the first input is given, the second must be too.
    Requires(&'static str, &'static str),
}

#[derive(Debug)]
pub struct Action {
    pub name: &'static str,
    pub doc: &'static str,
    pub inputs: &'static [Input],
    pub outputs: &'static [(&'static str, &'static str)],
    /// The action creates something a rollback or a drill's teardown removes.
    pub creates: bool,
    /// Checks verify the rebuilt stack; a drill reports them.
    pub check: bool,
    /// Waits for `ferry approve`; never executed.
    pub approval: bool,
    /// How its inputs go together.
    pub rules: &'static [Rule],
}

const fn req(name: &'static str, ty: Ty, doc: &'static str) -> Input {
    Input {
        name,
        ty,
        required: true,
        doc,
        format: Format::Free,
    }
}

const fn opt(name: &'static str, ty: Ty, doc: &'static str) -> Input {
    Input {
        name,
        ty,
        required: false,
        doc,
        format: Format::Free,
    }
}

impl Input {
    const fn shaped(self, format: Format) -> Input {
        Input { format, ..self }
    }
}

const fn key(name: &'static str, format: Format, doc: &'static str) -> Key {
    Key {
        name,
        required: true,
        format,
        doc,
    }
}

const DEADLINE: Input = opt(
    "deadline",
    Ty::Duration,
    "keep trying until this long after the step started (default 2m)",
);
const INTERVAL: Input = opt("interval", Ty::Duration, "pause between tries (default 1s)");

pub static ACTIONS: &[Action] = &[
    Action {
        name: "volume.restore",
        doc: "Restore one disk of a recovery point as a volume of the target: an image file in the run's work directory (local), an EBS snapshot written through the EBS direct APIs (aws). Resumes a partial restore.",
        inputs: &[
            req(
                "point",
                Ty::String,
                "recovery point: an id, SOURCE@latest or SOURCE@TIME",
            ),
            opt(
                "disk",
                Ty::String,
                "which disk of the point (default: its only disk)",
            ),
            opt("format", Ty::String, "raw (default, sparse) or qcow2"),
            opt(
                "repo",
                Ty::String,
                "repository (default: the run's -r/--repo)",
            ),
            opt(
                "to",
                Ty::String,
                "an existing disk to bring to the point in place (failback: the original machine's disk, local and libvirt): only the chunks that differ are fetched and only the 4 KiB blocks that differ are written; refused while a VM has it open; the undo leaves it",
            ),
            opt(
                "base",
                Ty::String,
                "with `to`: a recovery point `to` is known to hold (the one its machine was last protected at): what the two points share is neither read nor written",
            ),
        ],
        outputs: &[
            (
                "path",
                "the volume: an image file (local), a snapshot id (aws); `to` when given",
            ),
            ("format", "raw or qcow2"),
            ("point", "the recovery point's id"),
            ("source", "the point's source"),
            ("point_time", "when the point was taken (RFC 3339)"),
            (
                "rpo_secs",
                "seconds between the point and the start of the run",
            ),
            ("size", "disk size in bytes"),
            (
                "bytes_written",
                "with `to`: bytes written to the disk (what differed)",
            ),
            (
                "bytes_skipped",
                "with `base`: bytes the two points share, neither read nor written",
            ),
        ],
        creates: true,
        check: false,
        approval: false,
        rules: &[Rule::Requires("base", "to")],
    },
    Action {
        name: "volume.backup",
        doc: "Take a recovery point of a disk where the stack runs, so that failback or cutover carries its changes: an image file no VM has open, or a running VM's disk cut through QEMU (QMP), incrementally through its dirty bitmaps when `ferry protect` or an earlier backup left a chain (local).",
        inputs: &[
            req(
                "source",
                Ty::String,
                "the source the point is kept under (the original machine's, so that SOURCE@latest is this point)",
            ),
            req(
                "path",
                Ty::String,
                "the disk: an image file (a volume.restore output `path`)",
            ),
            opt(
                "qmp",
                Ty::String,
                "the QMP socket of the running VM that has `path` open (an instance.launch output `qmp`): the disk is cut live",
            ),
            opt(
                "pause",
                Ty::Bool,
                "with `qmp`: pause the VM before the cut and leave it paused, so that it writes nothing after the point (the final incremental); the undo resumes it",
            ),
            opt(
                "disk",
                Ty::String,
                "the disk's name in the point (default: the name in the source's latest point when it has one disk, else the file name)",
            ),
            opt(
                "repo",
                Ty::String,
                "repository (default: the run's -r/--repo)",
            ),
        ],
        outputs: &[
            ("point", "the new recovery point's id"),
            ("source", "its source"),
            ("disk", "the disk's name in the point"),
            ("point_time", "the instant it holds (RFC 3339)"),
            ("parent", "the point it is incremental to, if any"),
            (
                "mode",
                "how the disk was read: incremental through a bitmap, or a full read and why",
            ),
            ("bytes_read", "bytes of the disk read"),
            ("new_bytes", "bytes new to the repository"),
            ("paused", "whether this step paused the VM"),
        ],
        creates: true,
        check: false,
        approval: false,
        rules: &[Rule::Requires("pause", "qmp")],
    },
    Action {
        name: "volume.create",
        doc: "Create an empty image file.",
        inputs: &[
            req("size", Ty::String, "size, e.g. 64M or 2G"),
            opt("format", Ty::String, "raw (default) or qcow2"),
        ],
        outputs: &[("path", "the image file"), ("format", "raw or qcow2")],
        creates: true,
        check: false,
        approval: false,
        rules: &[],
    },
    Action {
        name: "instance.launch",
        doc: "Boot an instance with the given disks: a QEMU VM (software emulation) on its own user-mode network (local), an EC2 instance from the restored snapshots (aws).",
        inputs: &[
            opt(
                "kernel",
                Ty::String,
                "kernel image to boot directly (local; without it the first disk boots)",
            ),
            opt("initrd", Ty::String, "initramfs"),
            opt(
                "append",
                Ty::String,
                "kernel command line (console=ttyS0 is added)",
            ),
            opt(
                "disks",
                Ty::List,
                "image files, attached as virtio disks in order (vda, vdb, ...)",
            ),
            opt("memory", Ty::Integer, "MiB of memory (default 256)"),
            opt("cpus", Ty::Integer, "virtual CPUs (default 1)"),
            opt(
                "ports",
                Ty::List,
                "guest TCP ports to forward from 127.0.0.1 (a free host port each)",
            ),
            opt(
                "links",
                Ty::Map,
                "GUEST_IP:PORT -> HOST:PORT: the only outside addresses the guest may reach",
            ),
            opt(
                "isolated",
                Ty::Bool,
                "no network access beyond `links` (default: true in drills, false in runs)",
            ),
            opt(
                "ready",
                Ty::String,
                "text on the serial console that means the guest is up",
            ),
            opt(
                "ready_timeout",
                Ty::Duration,
                "how long to wait for `ready` (default 3m)",
            ),
            opt(
                "image",
                Ty::String,
                "an image to boot instead of the first disk (aws: an AMI id or a family from the target's `images` mapping)",
            ),
            opt(
                "instance_type",
                Ty::String,
                "the provider's size, overriding cpus/memory (aws: t3.small)",
            ),
            opt(
                "network",
                Ty::String,
                "the network to join (a network.create output `id`)",
            ),
            opt(
                "user_data",
                Ty::String,
                "data handed to the instance at boot (aws: cloud-init user data)",
            ),
        ],
        outputs: &[
            ("name", "the instance's name (aws: its instance id)"),
            ("pid", "the QEMU process"),
            ("ports", "map of guest port -> 127.0.0.1:HOST_PORT"),
            ("addr", "127.0.0.1:HOST_PORT of the first forwarded port"),
            ("console", "the serial console log file"),
            (
                "private_ip",
                "its address on `network`, where the network's other instances reach it",
            ),
            (
                "qmp",
                "its QEMU's QMP socket (local): what `ferry protect --vm NAME=QMP` and volume.backup's `qmp` take",
            ),
        ],
        creates: true,
        check: false,
        approval: false,
        rules: &[],
    },
    Action {
        name: "network.create",
        doc: "Create a private network with subnets and inbound firewall rules, routed nowhere else (aws: a VPC, subnets, a security group and a route table of its own).",
        inputs: &[
            req(
                "cidr",
                Ty::String,
                "the network's address range, e.g. 10.42.0.0/16",
            ),
            opt(
                "subnets",
                Ty::List,
                "subnet ranges inside it (default: one subnet of the whole range)",
            ),
            opt(
                "ingress",
                Ty::List,
                "inbound rules: `tcp/80`, `tcp/3306 from 10.42.0.0/16` (default source: the network itself)",
            ),
        ],
        outputs: &[
            ("id", "the network (aws: the VPC id)"),
            ("subnets", "the subnet ids, in order"),
            ("security_group", "the firewall (aws: security group id)"),
        ],
        creates: true,
        check: false,
        approval: false,
        rules: &[],
    },
    Action {
        name: "loadbalancer.create",
        doc: "Create a load balancer in a network, with a listener per `listeners` item forwarding to the `targets` (aws: an ALB for http listeners, an NLB for tcp/udp, one target group per listener with its health check).",
        inputs: &[
            req(
                "listeners",
                Ty::List,
                "what it listens on: `http:80`, `tcp:3306`, `udp:53`",
            )
            .shaped(Format::Listener),
            req(
                "network",
                Ty::String,
                "the network it lives in (a network.create output `id`)",
            ),
            opt(
                "targets",
                Ty::List,
                "the instances behind it (instance.launch outputs `name`)",
            ),
            opt(
                "target_port",
                Ty::Integer,
                "the port the targets listen on (default: each listener's port)",
            ),
            opt(
                "health_check",
                Ty::String,
                "what tells a healthy target: `http:8080/healthz`, `tcp:3306` (default: the traffic port, path / for http)",
            )
            .shaped(Format::Probe),
            opt(
                "kind",
                Ty::String,
                "alb (http listeners) or nlb (tcp/udp); default from the listeners",
            )
            .shaped(Format::OneOf(&["alb", "nlb"])),
            opt(
                "internal",
                Ty::Bool,
                "reachable only inside the network (default true: a network.create network has no way in from the internet)",
            ),
        ],
        outputs: &[
            ("id", "the load balancer (aws: its ARN)"),
            ("dns_name", "the name clients resolve"),
            ("addr", "DNS_NAME:PORT of the first listener"),
            ("kind", "alb or nlb"),
            ("target_groups", "the target groups, one per listener (aws: ARNs)"),
            (
                "zone_id",
                "the DNS zone its name lives in (aws: for alias records)",
            ),
        ],
        creates: true,
        check: false,
        approval: false,
        rules: &[],
    },
    Action {
        name: "dns.switch",
        doc: "Point a DNS name at the rebuilt stack: plain values, an alias to a load balancer, or a failover pair (primary with a health check, secondary served when it fails). The undo puts back what the name held before.",
        inputs: &[
            req(
                "zone",
                Ty::String,
                "the hosted zone: its name (example.com) or id",
            ),
            req(
                "name",
                Ty::String,
                "the record: www.example.com, www (in the zone) or @ (the zone's apex)",
            ),
            opt(
                "type",
                Ty::String,
                "A, AAAA, CNAME, TXT, MX, SRV, CAA (default: A for IPv4 values and aliases, AAAA for IPv6, else CNAME)",
            )
            .shaped(Format::OneOf(&[
                "A", "AAAA", "CNAME", "TXT", "MX", "SRV", "CAA", "NS", "PTR", "SPF",
            ])),
            opt("values", Ty::List, "the record's values"),
            opt(
                "alias",
                Ty::String,
                "a load balancer's name (a loadbalancer.create output `dns_name`) to alias",
            ),
            opt(
                "failover",
                Ty::Map,
                "a failover pair: {primary: VALUE, secondary: VALUE, health_check: http:80/healthz}; a value is an address, a host name or a load balancer's dns_name",
            )
            .shaped(Format::Keys(&[
                key(
                    "primary",
                    Format::Free,
                    "served while its health check passes",
                ),
                key(
                    "secondary",
                    Format::Free,
                    "served when the primary's health check fails",
                ),
                key(
                    "health_check",
                    Format::Probe,
                    "what is probed on the primary: `http:80/healthz`, `tcp:443`",
                ),
            ])),
            opt("ttl", Ty::Integer, "seconds resolvers may cache it (default 60)"),
        ],
        outputs: &[
            ("record", "the record's full name"),
            ("type", "its type"),
            ("values", "what it points at now"),
            ("zone_id", "the hosted zone's id"),
            ("change_id", "the DNS change (aws: Route 53 change id)"),
            ("health_check", "the primary's health check (failover pairs)"),
        ],
        creates: true,
        check: false,
        approval: false,
        rules: &[Rule::ExactlyOne(&["values", "alias", "failover"])],
    },
    Action {
        name: "database.restore",
        doc: "Restore a managed database from a snapshot, or from a source database to a point in time (aws: an RDS instance in a DB subnet group of the network).",
        inputs: &[
            req(
                "engine",
                Ty::String,
                "the database engine: mysql, mariadb, postgres, ...",
            ),
            opt(
                "snapshot",
                Ty::String,
                "the snapshot to restore from (aws: a DB snapshot identifier or ARN)",
            ),
            opt(
                "source",
                Ty::String,
                "the database to restore to `point_in_time` (aws: a DB instance identifier)",
            ),
            opt(
                "point_in_time",
                Ty::String,
                "when to restore `source` to: an RFC 3339 time or `latest`",
            )
            .shaped(Format::Time),
            opt(
                "instance_class",
                Ty::String,
                "the provider's size, overriding cpus/memory (aws: db.t3.medium)",
            ),
            opt("cpus", Ty::Integer, "virtual CPUs (default 1)"),
            opt("memory", Ty::Integer, "MiB of memory (default 1024)"),
            opt(
                "network",
                Ty::String,
                "the network it lives in (a network.create output `id`; required in drills)",
            ),
            opt(
                "port",
                Ty::Integer,
                "the port it listens on (default: the engine's)",
            ),
            opt(
                "ready_timeout",
                Ty::Duration,
                "how long to wait until it is available (default 1h)",
            ),
        ],
        outputs: &[
            ("id", "the database (aws: the DB instance identifier)"),
            ("endpoint", "ADDRESS:PORT"),
            ("address", "the host name clients connect to"),
            ("port", "the port"),
            ("engine", "the engine"),
            ("instance_class", "the size it runs on"),
        ],
        creates: true,
        check: false,
        approval: false,
        rules: &[
            Rule::ExactlyOne(&["snapshot", "point_in_time"]),
            Rule::Requires("point_in_time", "source"),
            Rule::Requires("source", "point_in_time"),
        ],
    },
    Action {
        name: "instance.stop",
        doc: "Stop a VM started by instance.launch (by its pid file).",
        inputs: &[req(
            "name",
            Ty::String,
            "the instance's name (an instance.launch output)",
        )],
        outputs: &[],
        creates: false,
        check: false,
        approval: false,
        rules: &[],
    },
    Action {
        name: "command.run",
        doc: "Run a program on the orchestrator's host (argv list, or one string run by sh -c).",
        inputs: &[
            req("run", Ty::Any, "a list of argv, or one string run by sh -c"),
            opt("env", Ty::Map, "extra environment"),
            opt("exit", Ty::Integer, "expected exit code (default 0)"),
        ],
        outputs: &[
            ("stdout", "standard output, trimmed"),
            ("exit", "exit code"),
        ],
        creates: false,
        check: false,
        approval: false,
        rules: &[],
    },
    Action {
        name: "approval",
        doc: "Wait until an operator runs `ferry approve RUN STEP` (or the API's approve).",
        inputs: &[opt(
            "message",
            Ty::String,
            "what the operator should confirm",
        )],
        outputs: &[("by", "who approved")],
        creates: false,
        check: false,
        approval: true,
        rules: &[],
    },
    Action {
        name: "wait",
        doc: "Pause for a while.",
        inputs: &[req("duration", Ty::Duration, "how long")],
        outputs: &[],
        creates: false,
        check: false,
        approval: false,
        rules: &[],
    },
    Action {
        name: "noop",
        doc: "Do nothing; its outputs are its inputs (for tests, benchmarks and wiring).",
        inputs: &[opt("outputs", Ty::Map, "values to output")],
        outputs: &[],
        creates: false,
        check: false,
        approval: false,
        rules: &[],
    },
    Action {
        name: "check.tcp",
        doc: "Wait until a TCP connection to ADDRESS succeeds.",
        inputs: &[req("address", Ty::String, "HOST:PORT"), DEADLINE, INTERVAL],
        outputs: &[
            ("tries", "connection attempts"),
            ("ready_secs", "seconds until it passed"),
        ],
        creates: false,
        check: true,
        approval: false,
        rules: &[],
    },
    Action {
        name: "check.http",
        doc: "Wait until an HTTP GET answers with the expected status (and body).",
        inputs: &[
            req("url", Ty::String, "http:// or https:// URL"),
            opt("status", Ty::Integer, "expected status (default 200)"),
            opt("contains", Ty::String, "text the body must contain"),
            opt(
                "matches",
                Ty::String,
                "regular expression the body must match",
            ),
            DEADLINE,
            INTERVAL,
        ],
        outputs: &[
            ("status", "the status"),
            ("tries", "requests made"),
            ("ready_secs", "seconds until it passed"),
        ],
        creates: false,
        check: true,
        approval: false,
        rules: &[],
    },
    Action {
        name: "check.command",
        doc: "Wait until a command exits with the expected code (and output).",
        inputs: &[
            req("run", Ty::Any, "a list of argv, or one string run by sh -c"),
            opt("exit", Ty::Integer, "expected exit code (default 0)"),
            opt("contains", Ty::String, "text the output must contain"),
            opt(
                "matches",
                Ty::String,
                "regular expression the output must match",
            ),
            opt("env", Ty::Map, "extra environment"),
            DEADLINE,
            INTERVAL,
        ],
        outputs: &[
            ("stdout", "standard output, trimmed"),
            ("tries", "runs"),
            ("ready_secs", "seconds until it passed"),
        ],
        creates: false,
        check: true,
        approval: false,
        rules: &[],
    },
    Action {
        name: "check.sql",
        doc: "Wait until a query on PostgreSQL or MySQL/MariaDB returns the expected value.",
        inputs: &[
            req(
                "url",
                Ty::String,
                "postgres://USER@HOST:PORT/DB or mysql://USER@HOST:PORT/DB (password from password_env)",
            ),
            req(
                "query",
                Ty::String,
                "the query; its first column of its first row is compared",
            ),
            opt(
                "expect",
                Ty::String,
                "the expected value, as text (default: any row)",
            ),
            opt(
                "password_env",
                Ty::String,
                "environment variable holding the password",
            ),
            DEADLINE,
            INTERVAL,
        ],
        outputs: &[
            ("value", "the value returned"),
            ("tries", "attempts"),
            ("ready_secs", "seconds until it passed"),
        ],
        creates: false,
        check: true,
        approval: false,
        rules: &[],
    },
    Action {
        name: "check.disk",
        doc: "Check a restored volume: its content digest equals the recovery point's, and its file system checks clean.",
        inputs: &[
            req(
                "path",
                Ty::String,
                "the image file (a volume.restore output)",
            ),
            req("point", Ty::String, "the recovery point it came from"),
            opt("disk", Ty::String, "which disk of the point"),
            opt(
                "fsck",
                Ty::Bool,
                "run e2fsck -n on it (default true when it holds ext2/3/4)",
            ),
            opt("repo", Ty::String, "repository (default: the run's)"),
        ],
        outputs: &[
            ("digest", "the content digest"),
            ("fs", "the file system found"),
        ],
        creates: false,
        check: true,
        approval: false,
        rules: &[],
    },
];

/// The action called `name`.
pub fn action(name: &str) -> Option<&'static Action> {
    ACTIONS.iter().find(|a| a.name == name)
}

impl Action {
    pub fn input(&self, name: &str) -> Option<&'static Input> {
        self.inputs.iter().find(|i| i.name == name)
    }

    /// Problems with how the given inputs go together (`given` says which
    /// are present): one message per broken [`Rule`].
    pub fn check_rules(&self, given: impl Fn(&str) -> bool) -> Vec<String> {
        let mut out = Vec::new();
        for rule in self.rules {
            match *rule {
                Rule::ExactlyOne(names) => {
                    let there: Vec<&str> = names.iter().copied().filter(|n| given(n)).collect();
                    let list = names
                        .iter()
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    match there.len() {
                        1 => {}
                        0 => out.push(format!("`{}` needs one of {list}", self.name)),
                        _ => out.push(format!(
                            "`{}` takes only one of {list}, not {}",
                            self.name,
                            there
                                .iter()
                                .map(|n| format!("`{n}`"))
                                .collect::<Vec<_>>()
                                .join(" and ")
                        )),
                    }
                }
                Rule::Requires(a, b) => {
                    if given(a) && !given(b) {
                        out.push(format!("`{}`: `{a}` needs `{b}`", self.name));
                    }
                }
            }
        }
        out
    }

    pub fn has_output(&self, name: &str) -> bool {
        self.name == "noop" || self.outputs.iter().any(|(o, _)| *o == name)
    }
}

/// A protocol and port, with a path for HTTP probes: a parsed
/// [`Format::Listener`] or [`Format::Probe`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `http`, `https`, `tcp` or `udp`, lower case.
    pub protocol: String,
    pub port: u16,
    /// For http and https probes: the path, `/` when not given.
    pub path: Option<String>,
}

/// Parses a listener: `http:80`, `tcp:3306`, `udp:53`.
pub fn parse_listener(s: &str) -> Result<Endpoint, String> {
    let bad =
        || format!("listener `{s}`: write PROTO:PORT with PROTO http, tcp or udp, e.g. `http:80`");
    let (proto, port) = s.trim().split_once(':').ok_or_else(bad)?;
    let protocol = proto.to_ascii_lowercase();
    if !matches!(protocol.as_str(), "http" | "tcp" | "udp") {
        return Err(bad());
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(bad)?;
    Ok(Endpoint {
        protocol,
        port,
        path: None,
    })
}

/// Parses a health-check probe: `http:8080/healthz`, `https:443`, `tcp:3306`.
pub fn parse_probe(s: &str) -> Result<Endpoint, String> {
    let bad = || {
        format!(
            "health check `{s}`: write PROTO:PORT[/PATH] with PROTO http, https or tcp, e.g. `http:80/healthz`"
        )
    };
    let (proto, rest) = s.trim().split_once(':').ok_or_else(bad)?;
    let protocol = proto.to_ascii_lowercase();
    let (port, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(rest[i..].to_owned())),
        None => (rest, None),
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(bad)?;
    let path = match protocol.as_str() {
        "http" | "https" => Some(path.unwrap_or_else(|| "/".into())),
        "tcp" if path.is_none() => None,
        "tcp" => {
            return Err(format!(
                "health check `{s}`: a tcp probe has no path (write `tcp:{port}`)"
            ));
        }
        _ => return Err(bad()),
    };
    if path
        .as_deref()
        .is_some_and(|p| p.chars().any(char::is_whitespace))
    {
        return Err(bad());
    }
    Ok(Endpoint {
        protocol,
        port,
        path,
    })
}

/// Whether `s` is an RFC 3339 time with a zone (`2025-01-31T12:00:00Z`,
/// `2025-01-31T12:00:00.5+02:00`), or `latest`.
pub fn is_time(s: &str) -> bool {
    let s = s.trim();
    if s == "latest" {
        return true;
    }
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let num = |r: std::ops::Range<usize>| {
        s.get(r)
            .and_then(|t| t.parse::<u32>().ok())
            .unwrap_or(u32::MAX)
    };
    if b.len() < 20
        || !digits(0..4)
        || b[4] != b'-'
        || !digits(5..7)
        || b[7] != b'-'
        || !digits(8..10)
        || !matches!(b[10], b'T' | b't' | b' ')
        || !digits(11..13)
        || b[13] != b':'
        || !digits(14..16)
        || b[16] != b':'
        || !digits(17..19)
    {
        return false;
    }
    if !(1..=12).contains(&num(5..7))
        || !(1..=31).contains(&num(8..10))
        || num(11..13) > 23
        || num(14..16) > 59
        || num(17..19) > 60
    {
        return false;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        rest = &frac[n..];
    }
    match rest {
        "Z" | "z" => true,
        zone => {
            let z = zone.as_bytes();
            z.len() == 6
                && matches!(z[0], b'+' | b'-')
                && z[1..3].iter().all(u8::is_ascii_digit)
                && z[3] == b':'
                && z[4..6].iter().all(u8::is_ascii_digit)
        }
    }
}

/// Whether a literal value fits `format`; the message names what is wrong.
/// Values that are templates (`${{ }}`) are left to the step's run, when
/// they are rendered; so are template items of lists and mappings.
pub fn check_format(format: Format, v: &serde_json::Value) -> Result<(), String> {
    use serde_json::Value;
    let templated = |v: &Value| v.as_str().is_some_and(|s| s.contains("${{"));
    if templated(v) {
        return Ok(());
    }
    let text = |v: &Value| crate::expr::to_text(v);
    let each = |v: &Value, f: &dyn Fn(&str) -> Result<(), String>| -> Result<(), String> {
        match v {
            Value::Array(items) => items
                .iter()
                .filter(|i| !templated(i))
                .try_for_each(|i| f(&text(i))),
            other => f(&text(other)),
        }
    };
    match format {
        Format::Free => Ok(()),
        Format::OneOf(words) => each(v, &|s| {
            if words.iter().any(|w| w.eq_ignore_ascii_case(s.trim())) {
                Ok(())
            } else {
                Err(format!("`{s}` is not one of {}", words.join(", ")))
            }
        }),
        Format::Listener => each(v, &|s| parse_listener(s).map(|_| ())),
        Format::Probe => each(v, &|s| parse_probe(s).map(|_| ())),
        Format::Time => each(v, &|s| {
            if is_time(s) {
                Ok(())
            } else {
                Err(format!(
                    "`{s}` is not a time: write RFC 3339 (2025-01-31T12:00:00Z) or `latest`"
                ))
            }
        }),
        Format::Keys(keys) => {
            let Value::Object(m) = v else {
                return Err(format!(
                    "must be a mapping with {}",
                    keys.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
                ));
            };
            let mut problems = Vec::new();
            for k in m.keys() {
                if !keys.iter().any(|x| x.name == k) {
                    problems.push(format!(
                        "has no key `{k}` (it takes {})",
                        keys.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
                    ));
                }
            }
            for k in keys {
                match m.get(k.name) {
                    None | Some(Value::Null) if k.required => {
                        problems.push(format!("needs `{}` ({})", k.name, k.doc));
                    }
                    Some(Value::String(s)) if k.required && s.trim().is_empty() => {
                        problems.push(format!("needs `{}` ({})", k.name, k.doc));
                    }
                    None | Some(Value::Null) => {}
                    Some(val) => {
                        if let Err(e) = check_format(k.format, val) {
                            problems.push(format!("`{}`: {e}", k.name));
                        }
                    }
                }
            }
            if problems.is_empty() {
                Ok(())
            } else {
                Err(problems.join("; "))
            }
        }
    }
}

/// Parses `500ms`, `30s`, `5m`, `2h`, `1d` or a number of seconds into milliseconds.
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "s" => 1000.0,
        "ms" => 1.0,
        "m" | "min" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        _ => return None,
    };
    let v = n * mult;
    (v.is_finite() && v >= 0.0).then_some(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("30s"), Some(30_000));
        assert_eq!(parse_duration_ms("1.5m"), Some(90_000));
        assert_eq!(parse_duration_ms("250ms"), Some(250));
        assert_eq!(parse_duration_ms("7"), Some(7000));
        assert_eq!(parse_duration_ms("5 parsecs"), None);
        assert_eq!(parse_duration_ms("m"), None);
    }

    #[test]
    fn listeners_probes_and_times() {
        assert_eq!(
            parse_listener("HTTP:80"),
            Ok(Endpoint {
                protocol: "http".into(),
                port: 80,
                path: None
            })
        );
        for bad in [
            "http",
            "http:0",
            "http:x",
            "ftp:21",
            "tcp:70000",
            "https:443",
        ] {
            assert!(parse_listener(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_probe("http:8080/healthz").unwrap().path.as_deref(),
            Some("/healthz")
        );
        assert_eq!(parse_probe("https:443").unwrap().path.as_deref(), Some("/"));
        assert_eq!(parse_probe("tcp:3306").unwrap().path, None);
        for bad in ["tcp:3306/x", "udp:53", "http:", "http:80/a b"] {
            assert!(parse_probe(bad).is_err(), "{bad}");
        }
        for good in [
            "latest",
            "2025-01-31T12:00:00Z",
            "2025-01-31T12:00:00.250+02:00",
        ] {
            assert!(is_time(good), "{good}");
        }
        for bad in [
            "yesterday",
            "2025-01-31",
            "2025-13-01T00:00:00Z",
            "2025-01-31T12:00:00",
        ] {
            assert!(!is_time(bad), "{bad}");
        }
    }

    #[test]
    fn formats_and_rules_name_the_problem() {
        use serde_json::json;
        assert!(check_format(Format::Listener, &json!(["http:80", "${{ params.l }}"])).is_ok());
        assert!(
            check_format(Format::Listener, &json!(["http:80", "smtp:25"]))
                .unwrap_err()
                .contains("`smtp:25`")
        );
        let lb = action("loadbalancer.create").unwrap();
        assert!(check_format(lb.input("kind").unwrap().format, &json!("ALB")).is_ok());
        assert!(check_format(lb.input("kind").unwrap().format, &json!("elb")).is_err());
        let failover = action("dns.switch")
            .unwrap()
            .input("failover")
            .unwrap()
            .format;
        let e = check_format(failover, &json!({"primary": "1.2.3.4", "backup": "x"})).unwrap_err();
        assert!(
            e.contains("no key `backup`") && e.contains("needs `secondary`"),
            "{e}"
        );
        let e = check_format(
            failover,
            &json!({"primary": "a", "secondary": "b", "health_check": "udp:53"}),
        )
        .unwrap_err();
        assert!(e.contains("`health_check`"), "{e}");
        let db = action("database.restore").unwrap();
        assert_eq!(
            db.check_rules(|n| n == "snapshot" || n == "point_in_time"),
            vec![
                "`database.restore` takes only one of `snapshot`, `point_in_time`, not `snapshot` and `point_in_time`",
                "`database.restore`: `point_in_time` needs `source`"
            ]
        );
        assert_eq!(
            db.check_rules(|_| false),
            vec!["`database.restore` needs one of `snapshot`, `point_in_time`"]
        );
        assert!(db.check_rules(|n| n == "snapshot").is_empty());
    }

    #[test]
    fn every_creating_action_can_be_undone_and_names_are_unique() {
        let mut names: Vec<_> = ACTIONS.iter().map(|a| a.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ACTIONS.len());
        for a in ACTIONS.iter().filter(|a| a.creates) {
            assert!(
                a.name.starts_with("volume.")
                    || [
                        "instance.launch",
                        "network.create",
                        "loadbalancer.create",
                        "dns.switch",
                        "database.restore"
                    ]
                    .contains(&a.name),
                "{}",
                a.name
            );
        }
    }
}
