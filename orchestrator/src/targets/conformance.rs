//! The conformance suite every [`Target`] implementation's tests call: what
//! the executor relies on, checked the same way for each target.
//!
//! - operations are idempotent under the step's key (a second try returns
//!   what the first made, and makes nothing more);
//! - undos tolerate what is already gone (deleting twice, terminating what
//!   never launched);
//! - a launch adopts what an interrupted try left (same instance, not a second);
//! - load balancers, DNS switches and database restores, where the target
//!   offers them and the test gives a request the target can serve, are
//!   idempotent too, and their undos leave nothing (a switched record is
//!   put back as it was);
//! - `health()` has no side effects.
//!
//! "Made" means what the run's work directory holds and, for a target with
//! resources elsewhere (a cloud), what its [`Inventory`] lists for the run.

use super::*;
use futures::future::BoxFuture;
use std::path::Path;

/// Lists what exists in the target for the suite's run (`kind id` lines),
/// so that the suite can see what a call made outside the work directory.
pub type Inventory = Arc<dyn Fn() -> BoxFuture<'static, Vec<String>> + Send + Sync>;

/// What the suite needs to exercise a target.
pub struct Setup {
    pub target: Arc<dyn Target>,
    /// The run every step of the suite belongs to.
    pub run: Arc<Ctx>,
    /// Where the runbook places the target (its settings).
    pub place: Placement,
    /// An instance the target can launch, if this machine can run one.
    pub launch: Option<InstanceLaunch>,
    /// What the target holds for the run, for targets with resources
    /// outside the work directory.
    pub inventory: Option<Inventory>,
    /// A load balancer the target can make. An empty `network` is filled
    /// with a network the suite makes (when the target offers networks).
    pub load_balancer: Option<LoadBalancerCreate>,
    /// A record the target can switch (in a zone the test made).
    pub dns: Option<DnsRecord>,
    /// A database the target can restore (from a snapshot the test made).
    pub database: Option<DatabaseRestore>,
}

fn step(s: &Setup, node: &str) -> StepCx {
    StepCx {
        run: s.run.clone(),
        place: Arc::new(s.place.clone()),
        node: node.into(),
        key: format!("{}/{node}", s.run.run_id),
    }
}

/// Everything the target made for the run, as far as the suite can see.
async fn made(s: &Setup) -> Vec<String> {
    let mut out: Vec<String> = snapshot(&s.run.work_dir)
        .into_iter()
        .map(|(p, len, t)| format!("file {} {len} {t:?}", p.display()))
        .collect();
    if let Some(inv) = &s.inventory {
        let mut listed = inv().await;
        listed.sort();
        out.extend(listed);
    }
    out
}

/// Every file under `dir`, with its size and modification time.
fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, u64, Option<std::time::SystemTime>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            }
            out.push((e.path(), m.len(), m.modified().ok()));
        }
    }
    out.sort();
    out
}

/// Runs the whole suite; panics naming the first promise broken.
pub async fn run(s: Setup) {
    let t = s.target.as_ref();

    // Health: the same probes as real work, and nothing made.
    let before = made(&s).await;
    let h = t.health(&s.run, &s.place).await;
    assert_eq!(h.target, t.kind());
    assert!(!h.probes.is_empty(), "health probes nothing");
    assert!(h.ok, "health failed: {:?}", h.probes);
    assert_eq!(before, made(&s).await, "health() made or changed something");

    if let Some(v) = t.volumes() {
        let cx = step(&s, "conf-vol");
        let req = VolumeCreate {
            size_bytes: 1 << 20,
            format: DiskFormat::Raw,
        };
        let first = v.create(&cx, req.clone()).await.expect("create");
        let after_first = made(&s).await;
        assert_ne!(before, after_first, "create made nothing the suite can see");
        let second = v.create(&cx, req).await.expect("create again");
        assert_eq!(first.path, second.path, "a second try made another volume");
        assert_eq!(
            after_first,
            made(&s).await,
            "a second try of create changed what the first made"
        );
        v.delete(&cx).await.expect("delete");
        v.delete(&cx).await.expect("delete of what is already gone");
        let never = step(&s, "conf-never-made");
        v.delete(&never).await.expect("delete of what never was");
        assert_eq!(
            before,
            made(&s).await,
            "delete left something of what create made"
        );
    }

    if let Some(n) = t.networks() {
        let cx = step(&s, "conf-net");
        let req = NetworkCreate {
            cidr: "10.77.0.0/16".into(),
            subnets: vec!["10.77.1.0/24".into(), "10.77.2.0/24".into()],
            ingress: vec!["tcp/80".into(), "tcp/3306 from 10.77.1.0/24".into()],
        };
        let first = n.create(&cx, req.clone()).await.expect("network create");
        assert_eq!(first.subnets.len(), 2, "{first:?}");
        let after_first = made(&s).await;
        let again = n.create(&cx, req).await.expect("network create again");
        assert_eq!(
            (&first.id, &first.subnets, &first.security_group),
            (&again.id, &again.subnets, &again.security_group),
            "a second try made another network"
        );
        assert_eq!(
            after_first,
            made(&s).await,
            "a second try changed the network"
        );
        n.delete(&cx).await.expect("network delete");
        n.delete(&cx)
            .await
            .expect("network delete of what is already gone");
        n.delete(&step(&s, "conf-never-net"))
            .await
            .expect("network delete of what never was");
        assert_eq!(before, made(&s).await, "network delete left something");
    }

    if let (Some(lbs), Some(mut req)) = (t.load_balancers(), s.load_balancer.clone()) {
        let net_cx = step(&s, "conf-lb-net");
        let made_network = req.network.is_empty();
        if made_network && let Some(n) = t.networks() {
            let net = n
                .create(
                    &net_cx,
                    NetworkCreate {
                        cidr: "10.78.0.0/16".into(),
                        subnets: vec!["10.78.1.0/24".into(), "10.78.2.0/24".into()],
                        ingress: vec!["tcp/80".into()],
                    },
                )
                .await
                .expect("a network for the load balancer");
            req.network = net.id;
        }
        let with_network = made(&s).await;
        let cx = step(&s, "conf-lb");
        let first = lbs
            .create(&cx, req.clone())
            .await
            .expect("load balancer create");
        let after_first = made(&s).await;
        if s.inventory.is_some() {
            assert_ne!(
                with_network, after_first,
                "load balancer create made nothing the suite can see"
            );
        }
        let again = lbs
            .create(&cx, req)
            .await
            .expect("load balancer create again");
        assert_eq!(
            (&first.id, &first.dns_name, &first.target_groups),
            (&again.id, &again.dns_name, &again.target_groups),
            "a second try made another load balancer"
        );
        assert_eq!(
            after_first,
            made(&s).await,
            "a second try changed the load balancer"
        );
        lbs.delete(&cx).await.expect("load balancer delete");
        lbs.delete(&cx)
            .await
            .expect("load balancer delete of what is already gone");
        lbs.delete(&step(&s, "conf-never-lb"))
            .await
            .expect("load balancer delete of what never was");
        assert_eq!(
            with_network,
            made(&s).await,
            "load balancer delete left something"
        );
        if made_network && let Some(n) = t.networks() {
            n.delete(&net_cx)
                .await
                .expect("network delete after the load balancer");
        }
        assert_eq!(
            before,
            made(&s).await,
            "the load balancer's network was left"
        );
    }

    if let (Some(d), Some(req)) = (t.dns(), s.dns.clone()) {
        let cx = step(&s, "conf-dns");
        let first = d.switch(&cx, req.clone()).await.expect("dns switch");
        let after_first = made(&s).await;
        if s.inventory.is_some() {
            assert_ne!(
                before, after_first,
                "dns switch made nothing the suite can see"
            );
        }
        let again = d.switch(&cx, req).await.expect("dns switch again");
        assert_eq!(
            (
                &first.record,
                &first.kind,
                &first.values,
                &first.health_check
            ),
            (
                &again.record,
                &again.kind,
                &again.values,
                &again.health_check
            ),
            "a second try switched to something else"
        );
        assert_eq!(
            after_first,
            made(&s).await,
            "a second try of the switch made something"
        );
        d.restore(&cx).await.expect("dns restore");
        d.restore(&cx)
            .await
            .expect("dns restore of what is already put back");
        d.restore(&step(&s, "conf-never-dns"))
            .await
            .expect("dns restore of what was never switched");
        assert_eq!(before, made(&s).await, "dns restore left something");
    }

    if let (Some(db), Some(req)) = (t.databases(), s.database.clone()) {
        let cx = step(&s, "conf-db");
        let first = db
            .restore(&cx, req.clone())
            .await
            .expect("database restore");
        let after_first = made(&s).await;
        if s.inventory.is_some() {
            assert_ne!(
                before, after_first,
                "database restore made nothing the suite can see"
            );
        }
        let again = db.restore(&cx, req).await.expect("database restore again");
        assert_eq!(
            (&first.id, &first.endpoint, &first.engine),
            (&again.id, &again.endpoint, &again.engine),
            "a second try restored another database"
        );
        assert_eq!(
            after_first,
            made(&s).await,
            "a second try of the restore made something"
        );
        db.delete(&cx).await.expect("database delete");
        db.delete(&cx)
            .await
            .expect("database delete of what is already gone");
        db.delete(&step(&s, "conf-never-db"))
            .await
            .expect("database delete of what never was");
        assert_eq!(before, made(&s).await, "database delete left something");
    }

    if let Some(i) = t.instances() {
        let never = step(&s, "conf-never-launched");
        i.terminate(&never)
            .await
            .expect("terminate of what never was");
        i.stop(&never, "conf-never-launched")
            .await
            .expect("stop of what never was");
        if let Some(req) = s.launch.clone() {
            let cx = step(&s, "conf-vm");
            let first = i.launch(&cx, req.clone()).await.expect("launch");
            let after_first = made(&s).await;
            let again = i.launch(&cx, req).await.expect("launch again");
            assert_eq!(
                (&first.name, first.pid, &first.ports),
                (&again.name, again.pid, &again.ports),
                "a second try launched another instance instead of adopting the first"
            );
            if s.inventory.is_some() {
                assert_eq!(
                    after_first,
                    made(&s).await,
                    "a second launch made something"
                );
            }
            i.terminate(&cx).await.expect("terminate");
            i.terminate(&cx).await.expect("terminate twice");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_ctx(dir: &Path) -> Arc<Ctx> {
        Arc::new(Ctx {
            run_id: "conformance".into(),
            work_dir: dir.to_path_buf(),
            drill: true,
            started_ms: 0,
            repo: None,
            password: None,
            secrets: Vec::new(),
        })
    }

    /// The guest `scripts/make-guest` builds, when this machine has one.
    fn guest() -> Option<InstanceLaunch> {
        let dir = std::env::var_os("FERRY_GUEST_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| "/var/tmp/ferry-guest".into());
        let kernel = dir.join("vmlinuz");
        let initrd = dir.join("initrd.gz");
        (kernel.exists() && initrd.exists()).then(|| InstanceLaunch {
            kernel: Some(kernel.to_string_lossy().into_owned()),
            initrd: Some(initrd.to_string_lossy().into_owned()),
            append: None,
            disks: Vec::new(),
            memory_mib: 128,
            cpus: 1,
            ports: vec![80],
            links: Vec::new(),
            isolated: Some(true),
            ready: None,
            ready_timeout: Duration::from_secs(60),
            image: None,
            instance_type: None,
            network: None,
            user_data: None,
        })
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn local_conforms() {
        let dir = tempfile::tempdir().unwrap();
        run(Setup {
            target: Arc::new(local::Local),
            run: run_ctx(dir.path()),
            place: Placement::default(),
            launch: guest(),
            inventory: None,
            load_balancer: None,
            dns: None,
            database: None,
        })
        .await;
    }

    /// A target whose create is not idempotent: the suite must catch it.
    struct Forgetful(std::sync::atomic::AtomicU32);

    #[async_trait]
    impl Volumes for Forgetful {
        async fn restore(&self, _: &StepCx, _: VolumeRestore) -> TargetResult<RestoredVolume> {
            Err(ActionError::permanent("not here"))
        }
        async fn create(&self, cx: &StepCx, _: VolumeCreate) -> TargetResult<CreatedVolume> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let path = cx.run.work_dir.join(format!("{}-{n}.raw", cx.node));
            std::fs::write(&path, b"").map_err(|e| ActionError::permanent(e.to_string()))?;
            Ok(CreatedVolume {
                path: path.to_string_lossy().into_owned(),
                format: DiskFormat::Raw,
            })
        }
        async fn delete(&self, _: &StepCx) -> TargetResult<()> {
            Ok(())
        }
    }

    #[async_trait]
    impl Target for Forgetful {
        fn kind(&self) -> &'static str {
            "forgetful"
        }
        fn volumes(&self) -> Option<&dyn Volumes> {
            Some(self)
        }
        async fn health(&self, _: &Ctx, _: &Placement) -> Health {
            Health {
                target: "forgetful".into(),
                ok: true,
                probes: vec![Probe {
                    what: "nothing".into(),
                    ok: true,
                    detail: String::new(),
                }],
            }
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_suite_catches_a_target_that_creates_twice() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = run_ctx(dir.path());
        let suite = tokio::spawn(run(Setup {
            target: Arc::new(Forgetful(Default::default())),
            run: ctx,
            place: Placement::default(),
            launch: None,
            inventory: None,
            load_balancer: None,
            dns: None,
            database: None,
        }));
        let err = suite.await.expect_err("the suite passed a broken target");
        assert!(err.is_panic());
    }
}
