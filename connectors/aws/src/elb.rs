//! ELBv2 load balancers a run makes: an application load balancer (HTTP
//! listeners) or a network load balancer (TCP/UDP) in a network's subnets,
//! one target group per listener with its health check, the step's
//! instances registered in each, and a listener forwarding to it.
//!
//! ELBv2 takes no client token, so everything is named from the step's key
//! ([`short_name`]: the load balancer `ferry-RRRRRRRR-KKKKKKKKKKKK`, its
//! target groups the same name with `-N` for the Nth listener): a retry
//! finds what an earlier try made and adopts it, and creates carry the
//! [`TAG_RUN`] and [`TAG_KEY`] tags atomically. Deletes treat "not found"
//! as done.

use crate::{Aws, Error, Result, TAG_KEY, TAG_RUN, api_error, run_of, run_prefix, short_name};
use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, LoadBalancerSchemeEnum, LoadBalancerStateEnum, LoadBalancerTypeEnum,
    ProtocolEnum, Tag, TargetDescription, TargetTypeEnum,
};
use std::time::{Duration, Instant};

/// Application (HTTP, layer 7) or network (TCP/UDP, layer 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Application,
    Network,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Application => "alb",
            Kind::Network => "nlb",
        }
    }
}

/// A listener: a protocol (`http`, `tcp`, `udp`) and a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub protocol: String,
    pub port: u16,
}

/// What a target group probes: `http`, `https` or `tcp`, a port (the
/// traffic port when `None`) and, for HTTP, a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub protocol: String,
    pub port: Option<u16>,
    pub path: Option<String>,
}

/// A load balancer to make.
#[derive(Clone, Debug)]
pub struct Spec {
    pub kind: Kind,
    /// Reachable only inside the network (scheme `internal`).
    pub internal: bool,
    pub listeners: Vec<Listener>,
    /// EC2 instance ids registered behind every listener.
    pub targets: Vec<String>,
    /// The port targets listen on; each listener's own port when `None`.
    pub target_port: Option<u16>,
    pub health: Option<Probe>,
    pub network: crate::ec2::Layout,
}

/// What [`create`] made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadBalancer {
    pub arn: String,
    pub name: String,
    pub dns_name: String,
    /// The Route 53 zone of `dns_name`, for alias records.
    pub zone_id: String,
    /// One per listener, in the listeners' order.
    pub target_groups: Vec<String>,
    pub kind: Kind,
}

fn tags(key: &str) -> Vec<Tag> {
    [
        (TAG_RUN, run_of(key).to_owned()),
        (TAG_KEY, key.to_owned()),
        ("Name", crate::display_name(key)),
    ]
    .into_iter()
    .map(|(k, v)| Tag::builder().key(k).value(v).build())
    .collect()
}

fn protocol(p: &str) -> Result<ProtocolEnum> {
    match p {
        "http" => Ok(ProtocolEnum::Http),
        "https" => Ok(ProtocolEnum::Https),
        "tcp" => Ok(ProtocolEnum::Tcp),
        "udp" => Ok(ProtocolEnum::Udp),
        other => Err(Error::Invalid(format!(
            "protocol `{other}`: a load balancer here speaks http, tcp or udp"
        ))),
    }
}

/// The load balancer named `name`, if it exists.
async fn find(
    aws: &Aws,
    name: &str,
) -> Result<Option<aws_sdk_elasticloadbalancingv2::types::LoadBalancer>> {
    match aws.elb.describe_load_balancers().names(name).send().await {
        Ok(out) => Ok(out.load_balancers.unwrap_or_default().into_iter().next()),
        Err(e) => match api_error("DescribeLoadBalancers", &aws.endpoint, e) {
            e if e.is_not_found() => Ok(None),
            e => Err(e),
        },
    }
}

async fn find_target_group(aws: &Aws, name: &str) -> Result<Option<String>> {
    match aws.elb.describe_target_groups().names(name).send().await {
        Ok(out) => Ok(out
            .target_groups
            .unwrap_or_default()
            .into_iter()
            .find_map(|t| t.target_group_arn)),
        Err(e) => match api_error("DescribeTargetGroups", &aws.endpoint, e) {
            e if e.is_not_found() => Ok(None),
            e => Err(e),
        },
    }
}

/// Makes (or adopts) the load balancer of step `key`, its target groups,
/// registrations and listeners, and waits until it is active.
pub async fn create(aws: &Aws, key: &str, spec: &Spec, wait: Duration) -> Result<LoadBalancer> {
    let ep = &aws.endpoint;
    if spec.listeners.is_empty() {
        return Err(Error::Invalid(
            "a load balancer needs at least one listener".into(),
        ));
    }
    for l in &spec.listeners {
        let fits = match spec.kind {
            Kind::Application => l.protocol == "http",
            Kind::Network => matches!(l.protocol.as_str(), "tcp" | "udp"),
        };
        if !fits {
            return Err(Error::Invalid(format!(
                "listener `{}:{}` does not fit an {}: an alb listens on http, an nlb on tcp or udp",
                l.protocol,
                l.port,
                spec.kind.name()
            )));
        }
    }
    if let Some(t) = spec.targets.iter().find(|t| !t.starts_with("i-")) {
        return Err(Error::Invalid(format!(
            "target `{t}` is not an EC2 instance id: on aws, targets are instance.launch outputs (`name`)"
        )));
    }
    let subnets = spec.network.one_per_zone();
    if spec.kind == Kind::Application && subnets.len() < 2 {
        return Err(Error::Invalid(format!(
            "an application load balancer needs subnets in two availability zones, and network {} has {} zone(s): give its network.create two `subnets` (and no `zone` setting on the target)",
            spec.network.vpc_id,
            spec.network.zone_count()
        )));
    }
    let name = short_name(key);
    let lb = match find(aws, &name).await? {
        Some(lb) => lb,
        None => {
            let mut req = aws
                .elb
                .create_load_balancer()
                .name(&name)
                .set_subnets(Some(subnets))
                .scheme(if spec.internal {
                    LoadBalancerSchemeEnum::Internal
                } else {
                    LoadBalancerSchemeEnum::InternetFacing
                })
                .r#type(match spec.kind {
                    Kind::Application => LoadBalancerTypeEnum::Application,
                    Kind::Network => LoadBalancerTypeEnum::Network,
                })
                .set_tags(Some(tags(key)));
            if spec.kind == Kind::Application {
                req = req.set_security_groups(Some(spec.network.security_groups.clone()));
            }
            req.send()
                .await
                .map_err(|e| api_error("CreateLoadBalancer", ep, e))?
                .load_balancers
                .unwrap_or_default()
                .into_iter()
                .next()
                .ok_or_else(|| {
                    Error::State("CreateLoadBalancer returned no load balancer".into())
                })?
        }
    };
    let arn = lb
        .load_balancer_arn
        .clone()
        .ok_or_else(|| Error::State(format!("load balancer {name} has no ARN")))?;

    let mut target_groups = Vec::new();
    for (i, l) in spec.listeners.iter().enumerate() {
        let tg_name = format!("{name}-{i}");
        let port = spec.target_port.unwrap_or(l.port);
        let tg = match find_target_group(aws, &tg_name).await? {
            Some(arn) => arn,
            None => {
                let mut req = aws
                    .elb
                    .create_target_group()
                    .name(&tg_name)
                    .protocol(protocol(&l.protocol)?)
                    .port(i32::from(port))
                    .vpc_id(&spec.network.vpc_id)
                    .target_type(TargetTypeEnum::Instance)
                    .health_check_enabled(true)
                    .set_tags(Some(tags(key)));
                // UDP targets cannot be probed over UDP: TCP on the
                // traffic port unless the runbook says otherwise.
                let default_probe = Probe {
                    protocol: if l.protocol == "udp" {
                        "tcp".into()
                    } else {
                        l.protocol.clone()
                    },
                    port: None,
                    path: (l.protocol == "http").then(|| "/".to_owned()),
                };
                let probe = spec.health.clone().unwrap_or(default_probe);
                req = req
                    .health_check_protocol(protocol(&probe.protocol)?)
                    .health_check_port(
                        probe
                            .port
                            .map_or_else(|| "traffic-port".to_owned(), |p| p.to_string()),
                    );
                if let Some(path) = &probe.path {
                    req = req.health_check_path(path);
                }
                req.send()
                    .await
                    .map_err(|e| api_error("CreateTargetGroup", ep, e))?
                    .target_groups
                    .unwrap_or_default()
                    .into_iter()
                    .find_map(|t| t.target_group_arn)
                    .ok_or_else(|| {
                        Error::State("CreateTargetGroup returned no target group".into())
                    })?
            }
        };
        if !spec.targets.is_empty() {
            let targets = spec
                .targets
                .iter()
                .map(|id| {
                    TargetDescription::builder()
                        .id(id)
                        .port(i32::from(port))
                        .build()
                })
                .collect::<Vec<_>>();
            // Registering a registered target again changes nothing.
            aws.elb
                .register_targets()
                .target_group_arn(&tg)
                .set_targets(Some(targets))
                .send()
                .await
                .map_err(|e| api_error("RegisterTargets", ep, e))?;
        }
        target_groups.push(tg);
    }

    let existing: Vec<i32> = aws
        .elb
        .describe_listeners()
        .load_balancer_arn(&arn)
        .send()
        .await
        .map_err(|e| api_error("DescribeListeners", ep, e))?
        .listeners
        .unwrap_or_default()
        .into_iter()
        .filter_map(|l| l.port)
        .collect();
    for (l, tg) in spec.listeners.iter().zip(&target_groups) {
        if existing.contains(&i32::from(l.port)) {
            continue;
        }
        let forward = Action::builder()
            .r#type(ActionTypeEnum::Forward)
            .target_group_arn(tg)
            .build();
        aws.elb
            .create_listener()
            .load_balancer_arn(&arn)
            .protocol(protocol(&l.protocol)?)
            .port(i32::from(l.port))
            .default_actions(forward)
            .set_tags(Some(tags(key)))
            .send()
            .await
            .map_err(|e| api_error("CreateListener", ep, e))?;
    }

    let lb = wait_active(aws, &name, wait).await?;
    Ok(LoadBalancer {
        arn,
        name,
        dns_name: lb.dns_name.unwrap_or_default(),
        zone_id: lb.canonical_hosted_zone_id.unwrap_or_default(),
        target_groups,
        kind: spec.kind,
    })
}

async fn wait_active(
    aws: &Aws,
    name: &str,
    wait: Duration,
) -> Result<aws_sdk_elasticloadbalancingv2::types::LoadBalancer> {
    let until = Instant::now() + wait;
    loop {
        let Some(lb) = find(aws, name).await? else {
            return Err(Error::State(format!(
                "load balancer {name} vanished after it was made"
            )));
        };
        let state = lb.state.as_ref().and_then(|s| s.code.clone());
        match state {
            None | Some(LoadBalancerStateEnum::Active) => return Ok(lb),
            Some(LoadBalancerStateEnum::Failed) => {
                let reason = lb.state.and_then(|s| s.reason).unwrap_or_default();
                return Err(Error::State(format!(
                    "load balancer {name} failed to provision: {reason}"
                )));
            }
            Some(other) if Instant::now() >= until => {
                return Err(Error::Api {
                    call: "DescribeLoadBalancers",
                    endpoint: aws.endpoint.clone(),
                    code: None,
                    message: format!(
                        "load balancer {name} is still {} after {}s",
                        other.as_str(),
                        wait.as_secs()
                    ),
                    transient: true,
                });
            }
            Some(_) => tokio::time::sleep(Duration::from_secs(5)).await,
        }
    }
}

/// Deletes the load balancer step `key` made, then its target groups;
/// nothing there is success.
pub async fn delete(aws: &Aws, key: &str) -> Result<()> {
    let name = short_name(key);
    delete_named(aws, &name).await?;
    let prefix = format!("{name}-");
    for (tg, _) in target_groups(aws)
        .await?
        .into_iter()
        .filter(|(_, n)| n.starts_with(&prefix))
    {
        delete_target_group(aws, &tg).await?;
    }
    Ok(())
}

async fn delete_named(aws: &Aws, name: &str) -> Result<()> {
    let Some(arn) = find(aws, name).await?.and_then(|lb| lb.load_balancer_arn) else {
        return Ok(());
    };
    match aws
        .elb
        .delete_load_balancer()
        .load_balancer_arn(&arn)
        .send()
        .await
    {
        Ok(_) => {}
        Err(e) => match api_error("DeleteLoadBalancer", &aws.endpoint, e) {
            e if e.is_not_found() => {}
            e => return Err(e),
        },
    }
    // Its listeners go with it; its target groups and its network
    // interfaces are free once it is gone.
    let until = Instant::now() + Duration::from_secs(600);
    while find(aws, name).await?.is_some() {
        if Instant::now() >= until {
            return Err(Error::State(format!(
                "load balancer {name} is still there 10 minutes after it was deleted"
            )));
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    wait_interfaces_gone(aws, name).await
}

/// Waits (a bounded while) until the network interfaces AWS made for load
/// balancer `name` are released, so that deleting its network next does not
/// fail on a dependency. Gives up quietly: the network's delete then says
/// what still holds it.
async fn wait_interfaces_gone(aws: &Aws, name: &str) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(300);
    loop {
        let left = aws
            .ec2
            .describe_network_interfaces()
            .filters(
                crate::Filter::builder()
                    .name("description")
                    .values(format!("ELB app/{name}/*"))
                    .values(format!("ELB net/{name}/*"))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| api_error("DescribeNetworkInterfaces", &aws.endpoint, e))?
            .network_interfaces
            .unwrap_or_default()
            .len();
        if left == 0 {
            return Ok(());
        }
        if Instant::now() >= until {
            tracing::warn!(
                load_balancer = name,
                left,
                "network interfaces still held after 5 minutes"
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

async fn delete_target_group(aws: &Aws, arn: &str) -> Result<()> {
    match aws
        .elb
        .delete_target_group()
        .target_group_arn(arn)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => match api_error("DeleteTargetGroup", &aws.endpoint, e) {
            e if e.is_not_found() => Ok(()),
            e => Err(e),
        },
    }
}

/// Every target group: `(arn, name)`.
async fn target_groups(aws: &Aws) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut marker = None;
    loop {
        let page = aws
            .elb
            .describe_target_groups()
            .set_marker(marker)
            .send()
            .await
            .map_err(|e| api_error("DescribeTargetGroups", &aws.endpoint, e))?;
        out.extend(
            page.target_groups
                .unwrap_or_default()
                .into_iter()
                .filter_map(|t| Some((t.target_group_arn?, t.target_group_name?))),
        );
        match page.next_marker {
            Some(m) if !m.is_empty() => marker = Some(m),
            _ => return Ok(out),
        }
    }
}

/// Every load balancer: `(arn, name, dns name, canonical zone)`.
pub async fn load_balancers(aws: &Aws) -> Result<Vec<(String, String, String, String)>> {
    let mut out = Vec::new();
    let mut marker = None;
    loop {
        let page = aws
            .elb
            .describe_load_balancers()
            .set_marker(marker)
            .send()
            .await
            .map_err(|e| api_error("DescribeLoadBalancers", &aws.endpoint, e))?;
        out.extend(
            page.load_balancers
                .unwrap_or_default()
                .into_iter()
                .filter_map(|l| {
                    Some((
                        l.load_balancer_arn?,
                        l.load_balancer_name?,
                        l.dns_name.unwrap_or_default(),
                        l.canonical_hosted_zone_id.unwrap_or_default(),
                    ))
                }),
        );
        match page.next_marker {
            Some(m) if !m.is_empty() => marker = Some(m),
            _ => return Ok(out),
        }
    }
}

/// Of `arns`, those tagged as made by run `run`.
async fn tagged_with_run(aws: &Aws, arns: Vec<String>, run: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for chunk in arns.chunks(20) {
        let described = aws
            .elb
            .describe_tags()
            .set_resource_arns(Some(chunk.to_vec()))
            .send()
            .await
            .map_err(|e| api_error("DescribeTags", &aws.endpoint, e))?
            .tag_descriptions
            .unwrap_or_default();
        for d in described {
            let ours = d
                .tags
                .unwrap_or_default()
                .iter()
                .any(|t| t.key.as_deref() == Some(TAG_RUN) && t.value.as_deref() == Some(run));
            if ours && let Some(arn) = d.resource_arn {
                out.push(arn);
            }
        }
    }
    Ok(out)
}

/// Run `run`'s load balancers and target groups: found by the run's name
/// prefix, confirmed by the run's tag. `(load balancers (arn, name), target
/// groups)`.
async fn of_run(aws: &Aws, run: &str) -> Result<(Vec<(String, String)>, Vec<String>)> {
    let prefix = run_prefix(run);
    let lbs: Vec<(String, String)> = load_balancers(aws)
        .await?
        .into_iter()
        .filter(|(_, n, _, _)| n.starts_with(&prefix))
        .map(|(a, n, _, _)| (a, n))
        .collect();
    let ours = tagged_with_run(aws, lbs.iter().map(|(a, _)| a.clone()).collect(), run).await?;
    let lbs = lbs.into_iter().filter(|(a, _)| ours.contains(a)).collect();
    let tgs: Vec<String> = target_groups(aws)
        .await?
        .into_iter()
        .filter(|(_, n)| n.starts_with(&prefix))
        .map(|(a, _)| a)
        .collect();
    let tgs = tagged_with_run(aws, tgs, run).await?;
    Ok((lbs, tgs))
}

/// Run `run`'s load balancers and target groups, as `kind id` lines.
pub async fn list_run(aws: &Aws, run: &str) -> Result<Vec<String>> {
    let (lbs, tgs) = of_run(aws, run).await?;
    Ok(lbs
        .into_iter()
        .map(|(a, _)| format!("loadbalancer {a}"))
        .chain(tgs.into_iter().map(|a| format!("targetgroup {a}")))
        .collect())
}

/// Deletes run `run`'s load balancers, then their target groups.
pub async fn teardown(aws: &Aws, run: &str) -> Result<()> {
    let (lbs, tgs) = of_run(aws, run).await?;
    for (_, name) in &lbs {
        delete_named(aws, name).await?;
    }
    for tg in &tgs {
        delete_target_group(aws, tg).await?;
    }
    Ok(())
}

/// The calls real work makes, read-only: ELBv2 answers.
pub async fn health(aws: &Aws) -> Result<String> {
    aws.elb
        .describe_load_balancers()
        .page_size(1)
        .send()
        .await
        .map(|_| "load balancers listed".to_owned())
        .map_err(|e| api_error("DescribeLoadBalancers", &aws.endpoint, e))
}
