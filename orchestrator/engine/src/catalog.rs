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
}

const fn req(name: &'static str, ty: Ty, doc: &'static str) -> Input {
    Input {
        name,
        ty,
        required: true,
        doc,
    }
}

const fn opt(name: &'static str, ty: Ty, doc: &'static str) -> Input {
    Input {
        name,
        ty,
        required: false,
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
        ],
        outputs: &[
            (
                "path",
                "the volume: an image file (local), a snapshot id (aws)",
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
        ],
        creates: true,
        check: false,
        approval: false,
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
        ],
        creates: true,
        check: false,
        approval: false,
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
    },
    Action {
        name: "wait",
        doc: "Pause for a while.",
        inputs: &[req("duration", Ty::Duration, "how long")],
        outputs: &[],
        creates: false,
        check: false,
        approval: false,
    },
    Action {
        name: "noop",
        doc: "Do nothing; its outputs are its inputs (for tests, benchmarks and wiring).",
        inputs: &[opt("outputs", Ty::Map, "values to output")],
        outputs: &[],
        creates: false,
        check: false,
        approval: false,
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

    pub fn has_output(&self, name: &str) -> bool {
        self.name == "noop" || self.outputs.iter().any(|(o, _)| *o == name)
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
    fn every_creating_action_can_be_undone_and_names_are_unique() {
        let mut names: Vec<_> = ACTIONS.iter().map(|a| a.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ACTIONS.len());
        for a in ACTIONS.iter().filter(|a| a.creates) {
            assert!(
                a.name.starts_with("volume.")
                    || a.name == "instance.launch"
                    || a.name == "network.create",
                "{}",
                a.name
            );
        }
    }
}
