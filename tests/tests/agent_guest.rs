//! `ferry-agent` inside a Linux guest under software emulation (Debian's
//! kernel, scripts/make-guest's busybox userland with LVM, dmsetup and
//! era_invalidate): it enrolls with a `ferry serve` on the host, puts dm-era
//! under an LVM volume live while a writer runs, and streams points into S3
//! (moto on the host). Every point restores byte-identical to the snapshot
//! of its cut (copied by the agent's own post_cut hook), an incremental
//! cycle reads exactly the blocks its era target reported, a kill -9 of
//! the agent and an unclean reset of the guest both end in a valid chain
//! and a correct next point, and `ferry-agent release` gives the volume its
//! own table back. An agent on the host is in the guest agent's consistency
//! group: the two meet at the server's barrier while the guest's volume is
//! suspended.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::servers::Moto;
use common::*;

/// The LVM volume the agent protects, in MiB.
const LV_MIB: u64 = 64;

/// The initramfs appended to the guest's: the agent binary with the
/// libraries it loads, the script the guest runs, the repository password
/// and the truth hook.
fn agent_layer(dir: &Path, run_sh: &str, lv_mib: u64) -> PathBuf {
    let stage = dir.join("layer");
    let bin = ferry_bin().with_file_name("ferry-agent");
    assert!(
        bin.exists(),
        "{} is missing: build ferry-fleet",
        bin.display()
    );
    let put = |rel: &str, bytes: &[u8], mode: u32| {
        use std::os::unix::fs::PermissionsExt as _;
        let p = stage.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    // Without its debug information (hundreds of MB in a test build), which
    // the guest's RAM-backed root would have to hold.
    std::fs::create_dir_all(stage.join("bin")).unwrap();
    let st = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(stage.join("bin/ferry-agent"))
        .arg(&bin)
        .status()
        .unwrap();
    assert!(st.success(), "strip {}", bin.display());
    let ldd = Command::new("ldd").arg(&bin).output().unwrap();
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        put(
            lib.trim_start_matches('/'),
            &std::fs::read(lib).unwrap(),
            0o755,
        );
    }
    // A machine's CA certificates (the TLS stack wants them even for http).
    put(
        "etc/ssl/certs/ca-certificates.crt",
        &std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap(),
        0o644,
    );
    put("ferry/run.sh", run_sh.as_bytes(), 0o755);
    put("ferry/pw", b"correct horse\n", 0o600);
    // The agent's post_cut hook: copy the snapshot it is about to read (the
    // instant of the cut) into slot N of the truth disk, in the first boot.
    put(
        "ferry/truth.sh",
        format!(
            "#!/bin/sh\n[ \"$(cat /etc/ferry/boots)\" = 1 ] || exit 0\n\
             n=$(cat /tmp/truth-n 2>/dev/null || echo 0)\n[ \"$n\" -lt 8 ] || exit 0\n\
             dd if=$FERRY_VIEWS of=/dev/vdc bs=1M seek=$((n * {lv_mib})) conv=notrunc 2>/dev/null || exit 1\n\
             echo $((n + 1)) >/tmp/truth-n\n"
        )
        .as_bytes(),
        0o755,
    );
    let out = dir.join("layer.cpio.gz");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc -R 0:0 --quiet | gzip -1 > {}",
            stage.display(),
            out.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    out
}

/// Sends one QMP command to a QEMU's monitor socket.
fn qmp(sock: &Path, cmd: &str) {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).unwrap(); // greeting
    for c in ["{\"execute\":\"qmp_capabilities\"}", cmd] {
        writeln!(w, "{c}").unwrap();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            if line.contains("\"return\"") || line.contains("\"error\"") {
                assert!(!line.contains("\"error\""), "{c}: {line}");
                break;
            }
        }
    }
}

fn read_slice(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// What a guest run is made of.
struct Setup {
    lv_mib: u64,
    cow_mib: u64,
    block_kib: u32,
    interval: &'static str,
    /// The consistency group of the guest's agent, if any.
    group: Option<&'static str>,
    /// The truth hook: the first 8 cuts of the first boot copied to the
    /// third disk (a full copy of the volume each, so not for benchmarks).
    truth: bool,
    /// The shell the guest runs once enrolled and configured (the agent's
    /// config is /etc/ferry/agent.toml; `$boots` counts the boots).
    tail: String,
}

/// Moto, a `ferry serve` and a guest running the agent, all stopped on drop.
struct Lab {
    // The guest goes first, then the server, then moto.
    _qemu: Kill,
    env: Env,
    server: Served,
    _moto: Moto,
    auth: String,
    serial: PathBuf,
    qmp: PathBuf,
    pv: PathBuf,
    truth: PathBuf,
}

/// A process killed by PID when dropped.
struct Kill(u32);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Lab {
    /// Starts everything and boots the guest: LVM on its first disk (volumes
    /// `data`, `era`, `cow`), the agent enrolled for `/dev/vg0/data` as
    /// source `db-1` with dm-era configured, then `setup.tail`.
    fn start(setup: &Setup) -> Option<Lab> {
        let guest = guest()?;
        let moto = Moto::start()?;
        moto.create_bucket("fleet", false);
        let env = Env::at("s3://fleet/agents", moto.env());
        env.init();
        let server = serve(env.cmd(), &[]);
        let api = std::fs::read_to_string(env.path("home/api-token")).unwrap();
        let auth = format!("Authorization: Bearer {}", api.trim());
        let mut args = vec![
            "agent-token",
            "create",
            "--source",
            "db-1",
            "--device",
            "/dev/vg0/data",
            "--interval",
            setup.interval,
        ];
        if let Some(g) = setup.group {
            args.extend(["--group", g]);
        }
        let token = env.json(&args)["token"].as_str().unwrap().to_owned();
        let server_port = server
            .url
            .rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches('/')
            .to_owned();
        let lvm = "activation{udev_sync=0 udev_rules=0 monitoring=0} devices{obtain_device_list_from_udev=0}";
        let Setup {
            lv_mib,
            cow_mib,
            block_kib,
            ..
        } = *setup;
        let run_sh = format!(
            r#"#!/bin/sh
export PATH=/bin DM_DISABLE_UDEV=1 FERRY_LOG=info
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1
export AWS_ENDPOINT_URL=http://10.0.2.2:{moto} AWS_ALLOW_HTTP=true
C='{lvm}'
mkdir -p /etc/ferry
mount -t ext4 /dev/vdb /etc/ferry || {{ echo "ferry-test: no state disk"; exit 1; }}
boots=$(( $(cat /etc/ferry/boots 2>/dev/null || echo 0) + 1 ))
echo $boots >/etc/ferry/boots
sync
if [ $boots = 1 ]; then
  lvm pvcreate --config "$C" -qy /dev/vda &&
  lvm vgcreate --config "$C" -q vg0 /dev/vda &&
  lvm lvcreate --config "$C" -qy -Zn -Wn -n data -L {lv_mib}M vg0 &&
  lvm lvcreate --config "$C" -qy -Zn -Wn -n era -L 8M vg0 &&
  lvm lvcreate --config "$C" -qy -Zn -Wn -n cow -L {cow_mib}M vg0 || {{ echo "ferry-test: lvm failed"; exit 1; }}
else
  lvm vgchange --config "$C" -q -ay vg0 || {{ echo "ferry-test: vgchange failed"; exit 1; }}
fi
echo "ferry-test: table $(dmsetup table vg0-data)"
if [ ! -f /etc/ferry/agent.toml ]; then
  ferry-agent --config /etc/ferry/agent.toml enroll --server http://10.0.2.2:{server_port} \
    --token {token} --device /dev/vg0/data --password-file /ferry/pw || exit 1
  [ {truth} = true ] && printf 'pre_cut = "sync"\npost_cut = "/ferry/truth.sh"\n' >>/etc/ferry/agent.toml
  cat >>/etc/ferry/agent.toml <<'END'

[[dm_era]]
device = "/dev/vg0/data"
metadata = "/dev/vg0/era"
cow = "/dev/vg0/cow"
block_kib = {block_kib}
END
fi
{tail}
"#,
            moto = moto.port,
            tail = setup.tail,
            truth = setup.truth,
        );
        let layer = agent_layer(env.dir.path(), &run_sh, lv_mib);
        let initrd = env.path("initrd");
        let mut bytes = std::fs::read(guest.join("initrd.gz")).unwrap();
        bytes.extend(std::fs::read(&layer).unwrap());
        std::fs::write(&initrd, bytes).unwrap();

        // Disks: the LVM physical volume, the agent's state (ext4: its
        // config and policy survive a reset), and the truth slots.
        let pv = env.path("pv.raw");
        let state = env.path("state.raw");
        let truth = env.path("truth.raw");
        for (p, mib) in [
            (&pv, lv_mib + cow_mib + 16),
            (&state, 16),
            (&truth, if setup.truth { 8 * lv_mib } else { 1 }),
        ] {
            std::fs::File::create(p)
                .unwrap()
                .set_len(mib << 20)
                .unwrap();
        }
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&state)
            .status()
            .unwrap();
        assert!(st.success(), "mkfs.ext4");

        let serial = env.path("guest.serial");
        let qmp = env.path("guest.qmp");
        let pid_file = env.path("guest.pid");
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-accel", "tcg", "-cpu", "max", "-m", "768", "-smp", "2"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-daemonize")
            .arg("-pidfile")
            .arg(&pid_file)
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-kernel")
            .arg(guest.join("vmlinuz"))
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 quiet panic=-1 ferry.mode=script"])
            .args(["-netdev", "user,id=n0"])
            .args(["-device", "virtio-net-pci,netdev=n0,romfile="]);
        for d in [&pv, &state, &truth] {
            c.arg("-drive")
                .arg(format!("file={},format=raw,if=virtio", d.display()));
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Some(Lab {
            _qemu: Kill(pid),
            env,
            server,
            _moto: moto,
            auth,
            serial,
            qmp,
            pv,
            truth,
        })
    }

    /// The guest agent's last status (source db-1) as the server shows it.
    fn status(&self) -> Option<serde_json::Value> {
        let (code, body) = curl(&["-H", &self.auth, &format!("{}/api/agents", self.server.url)]);
        if code != 200 {
            return None;
        }
        let agents: serde_json::Value = serde_json::from_str(&body).ok()?;
        agents
            .as_array()?
            .iter()
            .find(|a| a["policy"]["source"] == "db-1")
            .map(|a| a["status"].clone())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }
}

#[test]
fn an_agent_in_a_guest_tracks_an_lvm_volume_with_dm_era() {
    // Boot 1: a writer, the agent killed with -9 right after its third cut
    // and started again. Boot 2 (after an unclean reset): one cycle with
    // nothing writing, then power off.
    let tail = r#"if [ $boots = 1 ]; then
  ferry-writer /dev/vg0/data 5 pattern 0 0 boot1 >/dev/null &
  ferry-agent --config /etc/ferry/agent.toml run &
  a=$!
  while [ "$(cat /tmp/truth-n 2>/dev/null || echo 0)" -lt 3 ]; do usleep 20000; done
  kill -9 $a
  echo "ferry-test: agent killed"
  echo "ferry-test: left behind: $(dmsetup table vg0-data)"
  exec ferry-agent --config /etc/ferry/agent.toml run
fi
ferry-agent --config /etc/ferry/agent.toml run --cycles 1 >/dev/null
echo "ferry-test: boot 2 rc=$?"
ferry-agent --config /etc/ferry/agent.toml release /dev/vg0/data
echo "ferry-test: released: $(dmsetup table vg0-data), layers left: $(dmsetup ls | grep -c ferry-)"
umount /etc/ferry
echo "ferry-test: boot 2 done""#;
    let Some(lab) = Lab::start(&Setup {
        lv_mib: LV_MIB,
        cow_mib: 32,
        block_kib: 64,
        interval: "2s",
        group: Some("shop"),
        truth: true,
        tail: tail.into(),
    }) else {
        return;
    };
    let (env, serial, truth, pv) = (&lab.env, &lab.serial, &lab.truth, &lab.pv);
    // A second machine of the application, on the host: an agent in scan
    // mode in the guest's consistency group, so the two cut together.
    let _host_agent = host_member(env, &lab.server, "app-1", "shop");

    // The statuses the agent pushes, by point, as the server shows them.
    let mut seen: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut killed_at = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(st) = lab.status()
            && let Some(p) = st["last_point"].as_str()
            && !seen.contains_key(p)
        {
            seen.insert(p.to_owned(), st.clone());
            order.push(p.to_owned());
        }
        let log = lab.log();
        if killed_at.is_none() && log.contains("ferry-test: agent killed") {
            killed_at = Some(order.len());
        }
        if killed_at.is_some_and(|k| order.len() >= k + 3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent made {} points ({killed_at:?} before the kill):\n{log}",
            order.len()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let log = lab.log();
    assert!(
        log.contains("ferry-test: left behind: 0 131072 snapshot-origin"),
        "the kill was meant to land during a cycle's read:\n{log}"
    );
    let killed_at = killed_at.unwrap();

    // An unclean reset: the device-mapper tables are gone, the writer's
    // last writes were tracked by nothing after the boot.
    qmp(&lab.qmp, "{\"execute\":\"system_reset\"}");
    let log = wait_serial(serial, "ferry-test: boot 2 done", Duration::from_secs(300));
    assert!(log.contains("ferry-test: boot 2 rc=0"), "{log}");
    let after_reset = lab.status().unwrap();
    let last = after_reset["last_point"].as_str().unwrap().to_owned();
    assert!(!seen.contains_key(&last), "no point after the reset");

    // What each cycle read: the first and the one after the reset read the
    // volume whole, every other exactly the blocks dm-era reported.
    let lv = LV_MIB << 20;
    for (i, p) in order.iter().enumerate() {
        let d = &seen[p]["devices"][0];
        assert_eq!(d["mode"], "dm-era", "{d}");
        if i == 0 {
            assert!(d["changed_bytes"].is_null(), "{d}");
            assert_eq!(d["bytes_read"], lv, "{d}");
            continue;
        }
        let changed = d["changed_bytes"].as_u64().unwrap_or_else(|| {
            panic!("cycle {i} (killed after {killed_at}) read the volume whole: {d}")
        });
        assert!(changed > 0 && changed < lv, "{d}");
        assert_eq!(d["bytes_read"].as_u64(), Some(changed), "{d}");
        assert!(seen[p]["pause_secs"].as_f64().unwrap() < 5.0, "{}", seen[p]);
    }
    let d = &after_reset["devices"][0];
    assert!(d["changed_bytes"].is_null(), "{d}");
    assert_eq!(d["bytes_read"], lv, "{d}");
    assert!(
        d["mode_reason"].as_str().unwrap().contains("restarted"),
        "{d}"
    );

    // Every point of the first boot restores to the snapshot its cut took
    // (the truth slots, in order; the killed cycle's slot has no point).
    let points: Vec<String> = env
        .json(&["points", "--source", "db-1"])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(points.last(), Some(&last));
    let restore = |p: &str, i: usize| -> Vec<u8> {
        let to = env.path(&format!("restored-{i}.raw"));
        env.ok(&["restore", p, "--disk", "data", "--to", to.to_str().unwrap()]);
        let b = std::fs::read(&to).unwrap();
        std::fs::remove_file(&to).unwrap();
        b
    };
    let mut slot = 0u64;
    let mut matched = 0;
    for (i, p) in points[..points.len() - 1].iter().enumerate() {
        let got = restore(p, i);
        if slot >= 8 {
            break;
        }
        let start = slot;
        while slot < 8 && read_slice(truth, slot * lv, lv) != got {
            slot += 1;
        }
        assert!(
            slot < 8 && slot <= start + 1,
            "point {i} ({p}) matches no snapshot from slot {start} on"
        );
        slot += 1;
        matched += 1;
    }
    assert!(
        matched >= 4,
        "only {matched} points had a snapshot to compare"
    );

    // The guest's dm-era cuts and the host's scan cuts met at the server's
    // barrier while the guest's volume was suspended.
    let db = env.json(&["points", "--source", "db-1"]);
    let app = env.json(&["points", "--source", "app-1"]);
    let together: Vec<&serde_json::Value> = db
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["group"]["arrived"]
                .as_array()
                .is_some_and(|a| a.len() == 2)
        })
        .collect();
    assert!(together.len() >= 3, "{db}");
    for p in &together {
        let g = &p["group"];
        assert!(
            app.as_array()
                .unwrap()
                .iter()
                .any(|q| q["group"]["round"] == g["round"]),
            "the host's point of round {} is missing",
            g["round"]
        );
        assert!(g["skew_ms"].as_f64().unwrap() < 2000.0, "{g}");
    }
    env.ok(&[
        "restore",
        "db-1@group-latest",
        "--disk",
        "data",
        "--to",
        env.path("g.raw").to_str().unwrap(),
    ]);

    // The point after the reset holds the volume as the reset left it.
    let table = log
        .lines()
        .rev()
        .find_map(|l| l.split("ferry-test: table ").nth(1))
        .unwrap();
    // And `ferry-agent release` gave the volume its own table back.
    assert!(
        log.contains(&format!("ferry-test: released: {table}, layers left: 0")),
        "{log}"
    );
    let offset: u64 = table.split_whitespace().nth(4).unwrap().parse().unwrap();
    let got = restore(&last, 99);
    assert!(
        got == read_slice(pv, offset * 512, lv),
        "the point after the reset differs from the volume"
    );
    env.ok(&["check"]);
}

/// An agent on the host protecting a small image as `source`, in `group`,
/// at the guest's interval, running until dropped.
fn host_member(env: &Env, server: &Served, source: &str, group: &str) -> Reaped {
    let img = env.path(&format!("{source}.img"));
    make_image(&img, 4 << 20, 3);
    let token = env.json(&[
        "agent-token",
        "create",
        "--source",
        source,
        "--device",
        img.to_str().unwrap(),
        "--interval",
        "2s",
        "--group",
        group,
    ])["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let config = env.path(&format!("{source}.toml"));
    // The repository's password and the object store's endpoint and
    // credentials, as ferry itself gets them.
    let agent = || {
        let mut c = Command::new(ferry_bin().with_file_name("ferry-agent"));
        for (k, v) in env.cmd().get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c.arg("--config").arg(&config);
        c
    };
    let out = agent()
        .args(["enroll", "--server", &server.url, "--token", &token])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    Reaped(
        agent()
            .arg("run")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// One phase of the benchmark, from the points the agent made in it.
struct Phase {
    name: &'static str,
    /// (cut, lag) of each point, in the guest's clock.
    points: Vec<(f64, f64)>,
    read: Vec<u64>,
    pauses: Vec<f64>,
    stored: u64,
    cpu_share: f64,
    writes: u64,
    /// How long the writer ran.
    secs: f64,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

impl Phase {
    /// RPO over the phase: between the commits of points k and k+1 the data
    /// an outage would lose reaches back to point k's cut. Sampled every
    /// 50 ms (all in the guest's clock, which the cuts and lags are in).
    fn rpo(&self) -> Vec<f64> {
        let mut out = Vec::new();
        for w in self.points.windows(2) {
            let (cut, lag) = w[0];
            let next_commit = w[1].0 + w[1].1;
            let mut t = cut + lag;
            while t < next_commit {
                out.push(t - cut);
                t += 0.05;
            }
        }
        out
    }

    fn row(&self) -> String {
        let mut rpo = self.rpo();
        let mut read: Vec<f64> = self.read.iter().map(|r| *r as f64).collect();
        let mut pauses = self.pauses.clone();
        let cycle = self
            .points
            .windows(2)
            .map(|w| w[1].0 - w[0].0)
            .collect::<Vec<_>>();
        let mut cycle = cycle;
        let written = self.writes * 4096;
        format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0}% | {:.1} MiB | {:.0} ms | {:.1} MB/s | {} |",
            self.name,
            self.points.len(),
            percentile(&mut cycle, 0.5),
            percentile(&mut rpo.clone(), 0.5),
            percentile(&mut rpo, 0.95),
            rpo.iter().copied().fold(0.0, f64::max),
            self.cpu_share * 100.0,
            percentile(&mut read, 0.5) / 1048576.0,
            percentile(&mut pauses, 0.5) * 1000.0,
            written as f64 / 1e6 / self.secs.max(1.0),
            if written > 0 {
                format!("{:.2}", self.stored as f64 / written as f64)
            } else {
                "-".into()
            },
        )
    }
}

const BENCH_SECS: u64 = 60;

/// The agent inside the guest, measured (bench/agent-guest.sh runs this):
/// an idle phase and a phase of random 4 KiB writes, each BENCH_SECS long,
/// at a 1 s interval, era blocks of FERRY_BENCH_BLOCK_KIB (64). Prints a
/// markdown table row per phase.
#[test]
#[ignore = "a benchmark: bench/agent-guest.sh"]
fn bench_agent_in_guest() {
    let var = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let block_kib = var("FERRY_BENCH_BLOCK_KIB", 64) as u32;
    let rate = var("FERRY_BENCH_RATE", 2500);
    let lv_mib = var("FERRY_BENCH_LV_MIB", 1024);
    // Each phase starts once the agent's first full read is done; the CPU
    // it costs is its utime+stime over the phase with its children's
    // (dmsetup, era_invalidate), in guest clock ticks.
    let tail = format!(
        r#"ferry-writer /dev/vg0/data {rate} random 0 0 base >/tmp/base.log &
w=$!
sleep 20
kill $w
echo "ferry-bench: baseline $(tail -n1 /tmp/base.log)"
ferry-agent --config /etc/ferry/agent.toml run >/dev/null 2>/tmp/agent.log &
a=$!
while ! grep -q protected /tmp/agent.log; do sleep 1; done
cpu() {{ set -- $(cat /proc/$a/stat); echo $(( ${{14}} + ${{15}} + ${{16}} + ${{17}} )); }}
up() {{ cut -d' ' -f1 /proc/uptime; }}
echo "ferry-bench: idle start $(cpu) $(up)"
sleep {BENCH_SECS}
echo "ferry-bench: idle end $(cpu) $(up)"
ferry-writer /dev/vg0/data {rate} random 0 0 bench >/tmp/writer.log &
w=$!
echo "ferry-bench: writes start $(cpu) $(up)"
sleep {BENCH_SECS}
kill $w
echo "ferry-bench: writes stop $(tail -n1 /tmp/writer.log)"
# Until two points were cut after the last write: the backlog is stored.
n=$(grep -c protected /tmp/agent.log)
while [ "$(grep -c protected /tmp/agent.log)" -lt $((n + 2)) ]; do sleep 1; done
echo "ferry-bench: writes end $(cpu) $(up)"
grep -v 'pack uploaded' /tmp/agent.log | tail -n 20
echo "ferry-bench: done""#
    );
    let Some(lab) = Lab::start(&Setup {
        lv_mib,
        cow_mib: 512,
        block_kib,
        interval: "1s",
        group: None,
        truth: false,
        tail,
    }) else {
        return;
    };
    let mut seen: BTreeMap<String, (String, serde_json::Value)> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(1800);
    let phase_now = |log: &str| {
        if log.contains("ferry-bench: writes start") {
            "writes"
        } else if log.contains("ferry-bench: idle start") {
            "idle"
        } else {
            "warm-up"
        }
    };
    let log = loop {
        let log = lab.log();
        if let Some(st) = lab.status()
            && let Some(p) = st["last_point"].as_str()
            && !seen.contains_key(p)
        {
            seen.insert(p.to_owned(), (phase_now(&log).to_owned(), st.clone()));
        }
        if log.contains("ferry-bench: done") {
            break log;
        }
        assert!(Instant::now() < deadline, "{log}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let marks = |name: &str| -> Vec<f64> {
        let line = log
            .lines()
            .find(|l| l.contains(&format!("ferry-bench: {name}")))
            .unwrap();
        line.split_whitespace()
            .skip(3)
            .take(2)
            .map(|v| v.parse().unwrap())
            .collect()
    };
    // ferry-writer's last heartbeat: "ferry-writer: t=S writes=N".
    let writer = |mark: &str| -> (f64, u64) {
        let l = log
            .lines()
            .find(|l| l.contains(&format!("ferry-bench: {mark}")))
            .unwrap_or_default();
        let field = |k: &str| {
            l.split(k)
                .nth(1)
                .and_then(|w| w.split_whitespace().next())
                .and_then(|w| w.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (field("t="), field("writes=") as u64)
    };
    let (base_t, base_n) = writer("baseline");
    let (writes_t, writes) = writer("writes stop");
    eprintln!(
        "writer alone on the volume: {:.0} writes/s; under protection: {:.0} writes/s",
        base_n as f64 / base_t.max(1.0),
        writes as f64 / writes_t.max(1.0)
    );
    let last = lab.status().unwrap_or_default();
    eprintln!(
        "agent: {} cycles ok, {} failed, last error {}",
        last["cycles_ok"], last["cycles_failed"], last["last_error"]
    );
    println!(
        "\nera blocks {block_kib} KiB, LV {lv_mib} MiB, writer asked for {rate}/s of random 4 KiB (alone on the volume it made {:.0}/s; under protection {:.0}/s), interval 1 s\n",
        base_n as f64 / base_t.max(1.0),
        writes as f64 / writes_t.max(1.0)
    );
    println!(
        "| phase | points | cycle s (median) | RPO p50 s | RPO p95 s | RPO max s | agent CPU (one core) | read per cycle (median) | pause (median) | written | stored per byte written |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for name in ["idle", "writes"] {
        let (s, e) = (
            marks(&format!("{name} start")),
            marks(&format!("{name} end")),
        );
        let mut pts: Vec<&serde_json::Value> = seen
            .values()
            .filter(|(ph, _)| ph == name)
            .map(|(_, st)| st)
            .collect();
        let cut = |st: &serde_json::Value| {
            chrono::DateTime::parse_from_rfc3339(st["last_cut"].as_str().unwrap())
                .unwrap()
                .timestamp_millis() as f64
                / 1000.0
        };
        pts.sort_by(|a, b| cut(a).total_cmp(&cut(b)));
        let phase = Phase {
            name,
            points: pts
                .iter()
                .map(|st| (cut(st), st["lag_secs"].as_f64().unwrap()))
                .collect(),
            read: pts
                .iter()
                .map(|st| st["devices"][0]["bytes_read"].as_u64().unwrap())
                .collect(),
            pauses: pts
                .iter()
                .filter_map(|st| st["pause_secs"].as_f64())
                .collect(),
            stored: pts
                .iter()
                .map(|st| st["stored_bytes"].as_u64().unwrap())
                .sum(),
            cpu_share: (e[0] - s[0]) / 100.0 / (e[1] - s[1]),
            writes: if name == "writes" { writes } else { 0 },
            secs: if name == "writes" { writes_t } else { 1.0 },
        };
        println!("{}", phase.row());
    }
}
