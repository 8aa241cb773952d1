//! Route 53 records a run switches to the rebuilt stack: plain values, an
//! alias to a load balancer, or a failover pair (PRIMARY with a health
//! check, SECONDARY served when it fails); and the undo that puts the name
//! back as it was.
//!
//! Records cannot carry tags, so each switch leaves a marker: a TXT record
//! `_ferry-RRRRRRRR-KKKKKKKKKKKK.ZONE` ([`short_name`] of the step's key)
//! written in the same atomic change batch as the switch itself. It holds
//! the step's key and run, the record it switched, and every record set of
//! that name and type the switch replaced (as JSON, base64 in chunks). The
//! undo reads it to put those back, in one batch that also deletes what the
//! switch wrote (with the exact values Route 53 holds, as DELETE requires)
//! and the marker; a teardown after a crash finds a run's markers by the
//! run's name prefix in every hosted zone. (This is the TXT-registry idea
//! that external DNS controllers use to know which records they own.)
//!
//! Health checks take a caller reference, which is the step's
//! [`short_name`] (so a retry finds the one an earlier try made, and a
//! teardown finds a run's by prefix), and carry the [`TAG_RUN`] and
//! [`TAG_KEY`] tags for the console.

use crate::{Aws, Error, Result, TAG_KEY, TAG_RUN, api_error, run_of, run_prefix, short_name};
use aws_sdk_route53::types::{
    AliasTarget, Change, ChangeAction, ChangeBatch, ChangeStatus, HealthCheckConfig,
    HealthCheckType, ResourceRecord, ResourceRecordSet, ResourceRecordSetFailover,
    ResourceRecordSetRegion, RrType, Tag, TagResourceType,
};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// What a switch points the name at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Plain values (addresses, a host name, text).
    Values(Vec<String>),
    /// An alias to the load balancer with this DNS name.
    Alias(String),
    /// A failover pair: each side an address, a host name or a load
    /// balancer's DNS name; the primary is served while `probe` passes.
    Failover {
        primary: String,
        secondary: String,
        probe: crate::elb::Probe,
    },
}

/// A record to switch.
#[derive(Clone, Debug)]
pub struct Spec {
    /// A hosted zone's name (`example.com`) or id.
    pub zone: String,
    /// `www.example.com`, `www` (in the zone) or `@`.
    pub name: String,
    /// A, AAAA, CNAME, ...; inferred from the values when `None`.
    pub kind: Option<String>,
    pub ttl: i64,
    pub target: Target,
}

/// What [`switch`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Switched {
    pub zone_id: String,
    /// The full name, with its final dot.
    pub record: String,
    pub kind: String,
    /// What the name points at now (values or alias targets; a failover
    /// pair's primary first).
    pub values: Vec<String>,
    pub change_id: String,
    pub health_check: Option<String>,
}

/// A record set as Ferry keeps it in a marker: every field of the routing
/// policies it can put back. Record sets with others (geolocation, CIDR,
/// geoproximity, traffic policies) are refused before anything changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<Alias>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multivalue: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alias {
    pub zone_id: String,
    pub dns_name: String,
    pub evaluate: bool,
}

fn built<T>(
    r: std::result::Result<T, aws_smithy_types::error::operation::BuildError>,
) -> Result<T> {
    r.map_err(|e| Error::Invalid(format!("a Route 53 request could not be built: {e}")))
}

/// `name` lower case with one final dot: how names are compared.
fn fqdn(name: &str) -> String {
    format!(
        "{}.",
        name.trim().trim_end_matches('.').to_ascii_lowercase()
    )
}

impl Record {
    fn from_sdk(r: &ResourceRecordSet) -> Result<Record> {
        let unsupported = if r.geo_location.is_some() {
            Some("geolocation")
        } else if r.cidr_routing_config.is_some() {
            Some("CIDR")
        } else if r.geo_proximity_location.is_some() {
            Some("geoproximity")
        } else if r.traffic_policy_instance_id.is_some() {
            Some("traffic-policy")
        } else {
            None
        };
        if let Some(what) = unsupported {
            return Err(Error::Invalid(format!(
                "record {} {} uses {what} routing, which Ferry cannot put back after a switch: switch it by hand, or remove that policy first",
                r.name,
                r.r#type.as_str()
            )));
        }
        Ok(Record {
            name: r.name.clone(),
            kind: r.r#type.as_str().to_owned(),
            ttl: r.ttl,
            values: r
                .resource_records
                .as_deref()
                .unwrap_or_default()
                .iter()
                .map(|v| v.value.clone())
                .collect(),
            alias: r.alias_target.as_ref().map(|a| Alias {
                zone_id: a.hosted_zone_id.clone(),
                dns_name: a.dns_name.clone(),
                evaluate: a.evaluate_target_health,
            }),
            set_id: r.set_identifier.clone(),
            failover: r.failover.as_ref().map(|f| f.as_str().to_owned()),
            weight: r.weight,
            region: r.region.as_ref().map(|x| x.as_str().to_owned()),
            multivalue: r.multi_value_answer,
            health_check: r.health_check_id.clone(),
        })
    }

    fn to_sdk(&self) -> Result<ResourceRecordSet> {
        let mut b = ResourceRecordSet::builder()
            .name(&self.name)
            .r#type(RrType::from(self.kind.as_str()))
            .set_ttl(self.ttl)
            .set_set_identifier(self.set_id.clone())
            .set_failover(
                self.failover
                    .as_deref()
                    .map(ResourceRecordSetFailover::from),
            )
            .set_weight(self.weight)
            .set_region(self.region.as_deref().map(ResourceRecordSetRegion::from))
            .set_multi_value_answer(self.multivalue)
            .set_health_check_id(self.health_check.clone());
        if !self.values.is_empty() {
            let records = self
                .values
                .iter()
                .map(|v| built(ResourceRecord::builder().value(v).build()))
                .collect::<Result<Vec<_>>>()?;
            b = b.set_resource_records(Some(records));
        }
        if let Some(a) = &self.alias {
            b = b.alias_target(built(
                AliasTarget::builder()
                    .hosted_zone_id(&a.zone_id)
                    .dns_name(&a.dns_name)
                    .evaluate_target_health(a.evaluate)
                    .build(),
            )?);
        }
        built(b.build())
    }

    /// What Route 53 tells record sets of one name and type apart by.
    fn same_set(&self, other: &Record) -> bool {
        fqdn(&self.name) == fqdn(&other.name)
            && self.kind == other.kind
            && self.set_id == other.set_id
    }
}

/// A hosted zone: `(id without "/hostedzone/", name with its final dot)`.
async fn resolve_zone(aws: &Aws, zone: &str) -> Result<(String, String)> {
    let ep = &aws.endpoint;
    let zone = zone.trim();
    let looks_like_id =
        !zone.contains('.') && zone.chars().all(|c| c.is_ascii_alphanumeric() || c == '/');
    if looks_like_id {
        let id = zone.trim_start_matches("/hostedzone/");
        let found = aws.route53.get_hosted_zone().id(id).send().await.map_err(
            |e| match api_error("GetHostedZone", ep, e) {
                e if e.is_not_found() => Error::Invalid(format!(
                    "there is no hosted zone {id} in this account: give the zone's id or its name"
                )),
                e => e,
            },
        )?;
        let z = found
            .hosted_zone
            .ok_or_else(|| Error::State(format!("GetHostedZone {id} returned no zone")))?;
        return Ok((id.to_owned(), fqdn(&z.name)));
    }
    let want = fqdn(zone);
    let zones = aws
        .route53
        .list_hosted_zones_by_name()
        .dns_name(&want)
        .max_items(10)
        .send()
        .await
        .map_err(|e| api_error("ListHostedZonesByName", ep, e))?
        .hosted_zones;
    let matching: Vec<_> = zones
        .into_iter()
        .filter(|z| fqdn(&z.name) == want)
        .collect();
    match matching.as_slice() {
        [] => Err(Error::Invalid(format!(
            "there is no hosted zone named {want} in this account: create it first, or give its id"
        ))),
        [z] => Ok((z.id.trim_start_matches("/hostedzone/").to_owned(), want)),
        several => Err(Error::Invalid(format!(
            "{} hosted zones are named {want} ({}): give `zone` as the id of the one to change",
            several.len(),
            several
                .iter()
                .map(|z| z.id.trim_start_matches("/hostedzone/"))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The record's full name inside `zone` (`@` is the apex).
fn record_name(name: &str, zone: &str) -> Result<String> {
    let name = name.trim();
    if name == "@" || name.is_empty() {
        return Ok(zone.to_owned());
    }
    let full = fqdn(name);
    if full == zone || full.ends_with(&format!(".{zone}")) {
        return Ok(full);
    }
    if name.ends_with('.') {
        return Err(Error::Invalid(format!(
            "record {name} is not inside zone {zone}"
        )));
    }
    Ok(fqdn(&format!("{name}.{zone}")))
}

/// Every record set named `name` of type `kind` in zone `zone_id`.
async fn record_sets(
    aws: &Aws,
    zone_id: &str,
    name: &str,
    kind: &str,
) -> Result<Vec<ResourceRecordSet>> {
    let mut out = Vec::new();
    let mut start = Some((name.to_owned(), kind.to_owned(), None::<String>));
    while let Some((n, t, id)) = start.take() {
        let page = aws
            .route53
            .list_resource_record_sets()
            .hosted_zone_id(zone_id)
            .start_record_name(n)
            .start_record_type(RrType::from(t.as_str()))
            .set_start_record_identifier(id)
            .max_items(100)
            .send()
            .await
            .map_err(|e| api_error("ListResourceRecordSets", &aws.endpoint, e))?;
        let before = out.len();
        for r in page.resource_record_sets {
            if fqdn(&r.name) != fqdn(name) || r.r#type.as_str() != kind {
                return Ok(out);
            }
            if !out.contains(&r) {
                out.push(r);
            }
        }
        if page.is_truncated
            && out.len() > before
            && let (Some(n), Some(t)) = (page.next_record_name, page.next_record_type)
        {
            start = Some((n, t.as_str().to_owned(), page.next_record_identifier));
        }
    }
    Ok(out)
}

/// The marker a switch of step `key` leaves, as Route 53 holds it.
#[derive(Clone, Debug)]
struct Marker {
    set: ResourceRecordSet,
    key: String,
    run: String,
    record: String,
    kind: String,
    prior: Vec<Record>,
}

fn marker_name(key: &str, zone: &str) -> String {
    format!("_{}.{zone}", short_name(key))
}

/// A TXT string: quoted, with `"` and `\` escaped.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    let inner = s
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(s);
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn marker_values(key: &str, record: &str, kind: &str, prior: &[Record]) -> Result<Vec<String>> {
    use base64::Engine as _;
    let json = serde_json::to_vec(prior)
        .map_err(|e| Error::State(format!("the replaced records cannot be recorded: {e}")))?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(json);
    let mut values = vec![
        quote(&format!("ferry:key={key}")),
        quote(&format!("ferry:run={}", run_of(key))),
        quote(&format!("ferry:record={record} {kind}")),
    ];
    // TXT strings hold at most 255 characters: the JSON goes in numbered
    // chunks, since Route 53 does not promise to keep values in order.
    for (i, chunk) in b64.as_bytes().chunks(200).enumerate() {
        values.push(quote(&format!(
            "ferry:prior={i:04}:{}",
            String::from_utf8_lossy(chunk)
        )));
    }
    Ok(values)
}

fn parse_marker(set: ResourceRecordSet) -> Option<Marker> {
    use base64::Engine as _;
    let values: Vec<String> = set
        .resource_records
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|r| unquote(&r.value))
        .collect();
    let field = |name: &str| {
        values
            .iter()
            .find_map(|v| v.strip_prefix(&format!("ferry:{name}=")).map(str::to_owned))
    };
    let key = field("key")?;
    let run = field("run")?;
    let (record, kind) = field("record")?
        .split_once(' ')
        .map(|(a, b)| (a.to_owned(), b.to_owned()))?;
    let mut chunks: Vec<(String, String)> = values
        .iter()
        .filter_map(|v| v.strip_prefix("ferry:prior="))
        .filter_map(|v| v.split_once(':'))
        .map(|(i, c)| (i.to_owned(), c.to_owned()))
        .collect();
    chunks.sort();
    let b64: String = chunks.into_iter().map(|(_, c)| c).collect();
    let prior = if b64.is_empty() {
        Vec::new()
    } else {
        let json = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        serde_json::from_slice(&json).ok()?
    };
    Some(Marker {
        set,
        key,
        run,
        record,
        kind,
        prior,
    })
}

async fn find_marker(aws: &Aws, zone_id: &str, name: &str) -> Result<Option<Marker>> {
    Ok(record_sets(aws, zone_id, name, "TXT")
        .await?
        .into_iter()
        .next()
        .and_then(parse_marker))
}

/// The health check step `key` made: found by its caller reference.
async fn find_health_check(aws: &Aws, key: &str) -> Result<Option<String>> {
    let reference = short_name(key);
    Ok(health_checks(aws)
        .await?
        .into_iter()
        .find(|(_, r)| r.starts_with(&reference))
        .map(|(id, _)| id))
}

/// Every health check: `(id, caller reference)`.
async fn health_checks(aws: &Aws) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut marker = None;
    loop {
        let page = aws
            .route53
            .list_health_checks()
            .set_marker(marker)
            .send()
            .await
            .map_err(|e| api_error("ListHealthChecks", &aws.endpoint, e))?;
        out.extend(
            page.health_checks
                .into_iter()
                .map(|h| (h.id, h.caller_reference)),
        );
        match page.next_marker {
            Some(m) if page.is_truncated && !m.is_empty() => marker = Some(m),
            _ => return Ok(out),
        }
    }
}

/// One side of a pair, or an alias: an address, a host name, or a load
/// balancer (an alias).
#[derive(Clone, Debug)]
enum Member {
    Value(String),
    Alias(Alias),
}

impl Member {
    fn kind(&self) -> &'static str {
        match self {
            Member::Alias(_) => "A",
            Member::Value(v) if v.parse::<std::net::Ipv4Addr>().is_ok() => "A",
            Member::Value(v) if v.parse::<std::net::Ipv6Addr>().is_ok() => "AAAA",
            Member::Value(_) => "CNAME",
        }
    }

    fn shown(&self) -> String {
        match self {
            Member::Value(v) => v.clone(),
            Member::Alias(a) => a.dns_name.clone(),
        }
    }
}

/// The load balancer whose DNS name is `name`, as an alias target.
async fn load_balancer_alias(aws: &Aws, name: &str) -> Result<Option<Alias>> {
    let want = name.trim().trim_end_matches('.').to_ascii_lowercase();
    Ok(crate::elb::load_balancers(aws)
        .await?
        .into_iter()
        .find(|(_, _, dns, _)| dns.trim_end_matches('.').eq_ignore_ascii_case(&want))
        .map(|(_, _, dns, zone)| Alias {
            zone_id: zone,
            dns_name: dns,
            evaluate: true,
        }))
}

async fn member(aws: &Aws, v: &str) -> Result<Member> {
    let v = v.trim();
    if v.parse::<std::net::IpAddr>().is_err()
        && let Some(a) = load_balancer_alias(aws, v).await?
    {
        return Ok(Member::Alias(a));
    }
    Ok(Member::Value(v.to_owned()))
}

fn check_kind(kind: &str, m: &Member) -> Result<()> {
    let fits = match (kind, m) {
        ("A" | "AAAA", Member::Alias(_)) => true,
        (_, Member::Alias(a)) => {
            return Err(Error::Invalid(format!(
                "{} is a load balancer, which a {kind} record cannot alias: use type A",
                a.dns_name
            )));
        }
        ("A", Member::Value(v)) => v.parse::<std::net::Ipv4Addr>().is_ok(),
        ("AAAA", Member::Value(v)) => v.parse::<std::net::Ipv6Addr>().is_ok(),
        ("CNAME", Member::Value(v)) => v.parse::<std::net::IpAddr>().is_err(),
        _ => true,
    };
    if fits {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "`{}` does not fit a record of type {kind}",
            m.shown()
        )))
    }
}

/// Makes (or finds) the health check of step `key`, probing `target`.
async fn ensure_health_check(
    aws: &Aws,
    key: &str,
    target: &Member,
    probe: &crate::elb::Probe,
) -> Result<String> {
    let ep = &aws.endpoint;
    if let Some(id) = find_health_check(aws, key).await? {
        return Ok(id);
    }
    let kind = match probe.protocol.as_str() {
        "http" => HealthCheckType::Http,
        "https" => HealthCheckType::Https,
        "tcp" => HealthCheckType::Tcp,
        other => {
            return Err(Error::Invalid(format!(
                "health check protocol `{other}`: use http, https or tcp"
            )));
        }
    };
    let port = probe.port.unwrap_or(match probe.protocol.as_str() {
        "https" => 443,
        _ => 80,
    });
    let mut config = HealthCheckConfig::builder()
        .r#type(kind)
        .port(i32::from(port))
        .request_interval(30)
        .failure_threshold(3);
    config = match target {
        Member::Value(v) if v.parse::<std::net::IpAddr>().is_ok() => config.ip_address(v),
        other => config.fully_qualified_domain_name(other.shown().trim_end_matches('.')),
    };
    if let Some(path) = &probe.path {
        config = config.resource_path(path);
    }
    let config = built(config.build())?;
    let mut reference = short_name(key);
    let created = loop {
        match aws
            .route53
            .create_health_check()
            .caller_reference(&reference)
            .health_check_config(config.clone())
            .send()
            .await
        {
            Ok(out) => break out,
            Err(e) => {
                let e = api_error("CreateHealthCheck", ep, e);
                // A caller reference stays taken after its health check is
                // deleted: a switch made again after an undo needs a fresh
                // one (still starting with the step's name, so it is found).
                if e.code() == Some("HealthCheckAlreadyExists") && reference == short_name(key) {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis())
                        .unwrap_or_default();
                    reference = format!("{}-{now}", short_name(key));
                    continue;
                }
                return Err(e);
            }
        }
    };
    let id = created
        .health_check
        .map(|h| h.id)
        .ok_or_else(|| Error::State("CreateHealthCheck returned no health check".into()))?;
    let tags = [
        (TAG_RUN, run_of(key).to_owned()),
        (TAG_KEY, key.to_owned()),
        ("Name", crate::display_name(key)),
    ]
    .into_iter()
    .map(|(k, v)| Tag::builder().key(k).value(v).build())
    .collect::<Vec<_>>();
    aws.route53
        .change_tags_for_resource()
        .resource_type(TagResourceType::Healthcheck)
        .resource_id(&id)
        .set_add_tags(Some(tags))
        .send()
        .await
        .map_err(|e| api_error("ChangeTagsForResource", ep, e))?;
    Ok(id)
}

async fn delete_health_check(aws: &Aws, id: &str) -> Result<()> {
    match aws
        .route53
        .delete_health_check()
        .health_check_id(id)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => match api_error("DeleteHealthCheck", &aws.endpoint, e) {
            e if e.is_not_found() => Ok(()),
            e => Err(e),
        },
    }
}

fn change(action: ChangeAction, set: ResourceRecordSet) -> Result<Change> {
    built(
        Change::builder()
            .action(action)
            .resource_record_set(set)
            .build(),
    )
}

/// Sends one atomic change batch and waits (up to `wait`) until Route 53's
/// servers all have it. Returns the change id.
async fn apply(
    aws: &Aws,
    zone_id: &str,
    comment: &str,
    changes: Vec<Change>,
    wait: Duration,
) -> Result<String> {
    let ep = &aws.endpoint;
    let batch = built(
        ChangeBatch::builder()
            .comment(comment)
            .set_changes(Some(changes))
            .build(),
    )?;
    let info = aws
        .route53
        .change_resource_record_sets()
        .hosted_zone_id(zone_id)
        .change_batch(batch)
        .send()
        .await
        .map_err(|e| api_error("ChangeResourceRecordSets", ep, e))?
        .change_info
        .ok_or_else(|| Error::State("ChangeResourceRecordSets returned no change".into()))?;
    let id = info.id.trim_start_matches("/change/").to_owned();
    let until = Instant::now() + wait;
    let mut status = info.status;
    while status != ChangeStatus::Insync {
        if Instant::now() >= until {
            return Err(Error::Api {
                call: "GetChange",
                endpoint: ep.clone(),
                code: None,
                message: format!(
                    "change {id} is still {} after {}s",
                    status.as_str(),
                    wait.as_secs()
                ),
                transient: true,
            });
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        status = aws
            .route53
            .get_change()
            .id(&id)
            .send()
            .await
            .map_err(|e| api_error("GetChange", ep, e))?
            .change_info
            .map(|c| c.status)
            .unwrap_or(ChangeStatus::Pending);
    }
    Ok(id)
}

/// Points the record of `spec` at its target, replacing every record set of
/// that name and type in one atomic change that also writes the step's
/// marker (see the module's doc). A second try of the same step keeps the
/// marker's record of what was there first.
pub async fn switch(aws: &Aws, key: &str, spec: &Spec, wait: Duration) -> Result<Switched> {
    let (zone_id, zone) = resolve_zone(aws, &spec.zone).await?;
    let record = record_name(&spec.name, &zone)?;
    let explicit = spec.kind.as_deref().map(str::to_ascii_uppercase);
    let mut desired = Vec::new();
    let mut health_check = None;
    let (kind, shown) = match &spec.target {
        Target::Values(values) => {
            if values.is_empty() {
                return Err(Error::Invalid(
                    "`values` is empty: give the record at least one value".into(),
                ));
            }
            let members: Vec<Member> = values
                .iter()
                .map(|v| Member::Value(v.trim().to_owned()))
                .collect();
            let kind = match &explicit {
                Some(k) => k.clone(),
                None => {
                    let kinds: std::collections::BTreeSet<&str> =
                        members.iter().map(Member::kind).collect();
                    if kinds.len() != 1 {
                        return Err(Error::Invalid(format!(
                            "the values of {record} mix addresses and names: give `type`"
                        )));
                    }
                    kinds.into_iter().next().unwrap_or("A").to_owned()
                }
            };
            for m in &members {
                check_kind(&kind, m)?;
            }
            if kind == "CNAME" && members.len() != 1 {
                return Err(Error::Invalid(format!(
                    "a CNAME record holds one name, and {record} was given {}",
                    members.len()
                )));
            }
            let values: Vec<String> = members
                .iter()
                .map(|m| match (kind.as_str(), m.shown()) {
                    ("TXT" | "SPF", v) if !v.starts_with('"') => quote(&v),
                    (_, v) => v,
                })
                .collect();
            desired.push(Record {
                name: record.clone(),
                kind: kind.clone(),
                ttl: Some(spec.ttl),
                values: values.clone(),
                alias: None,
                set_id: None,
                failover: None,
                weight: None,
                region: None,
                multivalue: None,
                health_check: None,
            });
            (kind, values)
        }
        Target::Alias(target) => {
            let Some(alias) = load_balancer_alias(aws, target).await? else {
                return Err(Error::Invalid(format!(
                    "alias `{target}` is not the DNS name of a load balancer in {}: use `values` for other names",
                    aws.region
                )));
            };
            let kind = explicit.clone().unwrap_or_else(|| "A".into());
            check_kind(&kind, &Member::Alias(alias.clone()))?;
            let shown = vec![alias.dns_name.clone()];
            desired.push(Record {
                name: record.clone(),
                kind: kind.clone(),
                ttl: None,
                values: Vec::new(),
                alias: Some(alias),
                set_id: None,
                failover: None,
                weight: None,
                region: None,
                multivalue: None,
                health_check: None,
            });
            (kind, shown)
        }
        Target::Failover {
            primary,
            secondary,
            probe,
        } => {
            let p = member(aws, primary).await?;
            let s = member(aws, secondary).await?;
            let kind = match &explicit {
                Some(k) => k.clone(),
                None if p.kind() == s.kind() => p.kind().to_owned(),
                None => {
                    return Err(Error::Invalid(format!(
                        "the primary `{}` makes a {} record and the secondary `{}` a {} record: a failover pair is one type; give `type` or make them alike",
                        p.shown(),
                        p.kind(),
                        s.shown(),
                        s.kind()
                    )));
                }
            };
            check_kind(&kind, &p)?;
            check_kind(&kind, &s)?;
            let hc = ensure_health_check(aws, key, &p, probe).await?;
            let short = short_name(key);
            for (role, m) in [("PRIMARY", &p), ("SECONDARY", &s)] {
                let (ttl, values, alias) = match m {
                    Member::Value(v) => (Some(spec.ttl), vec![v.clone()], None),
                    Member::Alias(a) => (None, Vec::new(), Some(a.clone())),
                };
                desired.push(Record {
                    name: record.clone(),
                    kind: kind.clone(),
                    ttl,
                    values,
                    alias,
                    // Unique in the zone: Route 53 tells the pair's sides
                    // apart by it, and a DELETE names it.
                    set_id: Some(format!("{short}-{}", role.to_ascii_lowercase())),
                    failover: Some(role.into()),
                    weight: None,
                    region: None,
                    multivalue: None,
                    health_check: (role == "PRIMARY").then(|| hc.clone()),
                });
            }
            health_check = Some(hc);
            (kind, vec![p.shown(), s.shown()])
        }
    };

    let current = record_sets(aws, &zone_id, &record, &kind)
        .await?
        .iter()
        .map(Record::from_sdk)
        .collect::<Result<Vec<_>>>()?;
    let mname = marker_name(key, &zone);
    let marker = find_marker(aws, &zone_id, &mname).await?;
    let prior = match &marker {
        Some(m) => m.prior.clone(),
        None => current.clone(),
    };
    let mut changes = Vec::new();
    for c in current
        .iter()
        .filter(|c| !desired.iter().any(|d| d.same_set(c)))
    {
        changes.push(change(ChangeAction::Delete, c.to_sdk()?)?);
    }
    for d in &desired {
        changes.push(change(ChangeAction::Upsert, d.to_sdk()?)?);
    }
    let marker_set = Record {
        name: mname,
        kind: "TXT".into(),
        ttl: Some(300),
        values: marker_values(key, &record, &kind, &prior)?,
        alias: None,
        set_id: None,
        failover: None,
        weight: None,
        region: None,
        multivalue: None,
        health_check: None,
    };
    changes.push(change(ChangeAction::Upsert, marker_set.to_sdk()?)?);
    let change_id = apply(
        aws,
        &zone_id,
        &format!("Ferry: switch {record} ({key})"),
        changes,
        wait,
    )
    .await?;
    Ok(Switched {
        zone_id,
        record,
        kind,
        values: shown,
        change_id,
        health_check,
    })
}

/// Undoes what step `key` switched: the records it wrote go, the ones it
/// replaced come back, the marker and the health check go. The marker is
/// looked for in every hosted zone, since an undo knows only the step's
/// key. Nothing there (never switched, or already undone) is success.
pub async fn restore(aws: &Aws, key: &str, wait: Duration) -> Result<()> {
    for (zone_id, zone) in zones(aws).await? {
        if let Some(m) = find_marker(aws, &zone_id, &marker_name(key, &zone)).await? {
            restore_marker(aws, &zone_id, m, wait).await?;
        }
    }
    drop_health_check(aws, key).await
}

async fn drop_health_check(aws: &Aws, key: &str) -> Result<()> {
    while let Some(id) = find_health_check(aws, key).await? {
        delete_health_check(aws, &id).await?;
    }
    Ok(())
}

async fn restore_marker(aws: &Aws, zone_id: &str, m: Marker, wait: Duration) -> Result<()> {
    let current = record_sets(aws, zone_id, &m.record, &m.kind)
        .await?
        .iter()
        .map(Record::from_sdk)
        .collect::<Result<Vec<_>>>()?;
    let mut changes = Vec::new();
    // DELETE must name a record set exactly as Route 53 holds it: these
    // are read back just now, not rebuilt from the switch's inputs.
    for c in current.iter().filter(|c| !m.prior.contains(c)) {
        changes.push(change(ChangeAction::Delete, c.to_sdk()?)?);
    }
    // UPSERT rather than CREATE: the batch is one change, but some
    // implementations check a CREATE against the records before the
    // batch's own DELETEs.
    for p in m.prior.iter().filter(|p| !current.contains(p)) {
        changes.push(change(ChangeAction::Upsert, p.to_sdk()?)?);
    }
    changes.push(change(ChangeAction::Delete, m.set.clone())?);
    apply(
        aws,
        zone_id,
        &format!("Ferry: undo the switch of {} ({})", m.record, m.key),
        changes,
        wait,
    )
    .await?;
    Ok(())
}

/// Every hosted zone: `(id, name)`.
async fn zones(aws: &Aws) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut marker = None;
    loop {
        let page = aws
            .route53
            .list_hosted_zones()
            .set_marker(marker)
            .send()
            .await
            .map_err(|e| api_error("ListHostedZones", &aws.endpoint, e))?;
        out.extend(page.hosted_zones.into_iter().map(|z| {
            (
                z.id.trim_start_matches("/hostedzone/").to_owned(),
                fqdn(&z.name),
            )
        }));
        match page.next_marker {
            Some(m) if page.is_truncated && !m.is_empty() => marker = Some(m),
            _ => return Ok(out),
        }
    }
}

/// Run `run`'s markers in every hosted zone: `(zone id, marker)`.
async fn markers_of_run(aws: &Aws, run: &str) -> Result<Vec<(String, Marker)>> {
    let prefix = format!("_{}", run_prefix(run));
    let mut out = Vec::new();
    for (zone_id, _) in zones(aws).await? {
        let mut start: Option<(String, RrType, Option<String>)> = None;
        loop {
            let page = aws
                .route53
                .list_resource_record_sets()
                .hosted_zone_id(&zone_id)
                .set_start_record_name(start.as_ref().map(|s| s.0.clone()))
                .set_start_record_type(start.as_ref().map(|s| s.1.clone()))
                .set_start_record_identifier(start.as_ref().and_then(|s| s.2.clone()))
                .send()
                .await
                .map_err(|e| api_error("ListResourceRecordSets", &aws.endpoint, e))?;
            for set in page.resource_record_sets {
                if set.r#type == RrType::Txt
                    && set.name.to_ascii_lowercase().starts_with(&prefix)
                    && let Some(m) = parse_marker(set)
                    && m.run == run
                {
                    out.push((zone_id.clone(), m));
                }
            }
            match (
                page.is_truncated,
                page.next_record_name,
                page.next_record_type,
            ) {
                (true, Some(n), Some(t)) => start = Some((n, t, page.next_record_identifier)),
                _ => break,
            }
        }
    }
    Ok(out)
}

/// Run `run`'s health checks: by the caller reference's prefix.
async fn health_checks_of_run(aws: &Aws, run: &str) -> Result<Vec<String>> {
    let prefix = run_prefix(run);
    Ok(health_checks(aws)
        .await?
        .into_iter()
        .filter(|(_, r)| r.starts_with(&prefix))
        .map(|(id, _)| id)
        .collect())
}

/// Run `run`'s switched records and health checks, as `kind id` lines.
pub async fn list_run(aws: &Aws, run: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> = markers_of_run(aws, run)
        .await?
        .into_iter()
        .map(|(zone, m)| format!("dnsrecord {zone} {} {}", m.record, m.kind))
        .collect();
    out.extend(
        health_checks_of_run(aws, run)
            .await?
            .into_iter()
            .map(|id| format!("healthcheck {id}")),
    );
    Ok(out)
}

/// Undoes every switch of run `run` (found by its markers), then deletes
/// its health checks.
pub async fn teardown(aws: &Aws, run: &str) -> Result<()> {
    for (zone_id, m) in markers_of_run(aws, run).await? {
        restore_marker(aws, &zone_id, m, Duration::from_secs(600)).await?;
    }
    for id in health_checks_of_run(aws, run).await? {
        delete_health_check(aws, &id).await?;
    }
    Ok(())
}

/// The calls real work makes, read-only: Route 53 answers.
pub async fn health(aws: &Aws) -> Result<String> {
    aws.route53
        .list_hosted_zones()
        .max_items(1)
        .send()
        .await
        .map(|_| "hosted zones listed".to_owned())
        .map_err(|e| api_error("ListHostedZones", &aws.endpoint, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_inside_the_zone() {
        let z = "example.com.";
        assert_eq!(record_name("@", z).unwrap(), "example.com.");
        assert_eq!(record_name("www", z).unwrap(), "www.example.com.");
        assert_eq!(
            record_name("WWW.example.com", z).unwrap(),
            "www.example.com."
        );
        assert_eq!(
            record_name("www.example.com.", z).unwrap(),
            "www.example.com."
        );
        assert!(record_name("www.other.org.", z).is_err());
    }

    #[test]
    fn markers_round_trip_what_they_replaced() {
        let prior = vec![Record {
            name: "www.example.com.".into(),
            kind: "A".into(),
            ttl: Some(300),
            values: (0..40).map(|i| format!("10.0.0.{i}")).collect(),
            alias: None,
            set_id: None,
            failover: None,
            weight: None,
            region: None,
            multivalue: None,
            health_check: None,
        }];
        let values = marker_values("run \"1\"/dns", "www.example.com.", "A", &prior).unwrap();
        assert!(values.iter().all(|v| v.len() <= 255), "{values:?}");
        let mut records = values
            .iter()
            .map(|v| ResourceRecord::builder().value(v).build().unwrap())
            .collect::<Vec<_>>();
        records.reverse();
        let set = ResourceRecordSet::builder()
            .name("_m.example.com.")
            .r#type(RrType::Txt)
            .set_resource_records(Some(records))
            .build()
            .unwrap();
        let m = parse_marker(set).unwrap();
        assert_eq!(m.key, "run \"1\"/dns");
        assert_eq!(m.run, "run \"1\"");
        assert_eq!(
            (m.record.as_str(), m.kind.as_str()),
            ("www.example.com.", "A")
        );
        assert_eq!(m.prior, prior);
    }
}
