//! RDS databases a run restores: from a DB snapshot, or from a source DB
//! instance to a point in time, in a DB subnet group made in the network's
//! subnets with the network's security groups; and their deletion (no
//! final snapshot: the restored copy is disposable, its source is not
//! touched).
//!
//! RDS takes no client token, so the DB instance and its subnet group are
//! named from the step's key ([`short_name`]): a retry finds what an earlier
//! try made and adopts it. Both carry the [`TAG_RUN`] and [`TAG_KEY`] tags
//! from their create call on. Deletes treat "not found" as done.

use crate::{Aws, Error, Result, TAG_KEY, TAG_RUN, api_error, run_of, run_prefix, short_name};
use aws_sdk_rds::types::{DbInstance, Tag};
use std::time::{Duration, Instant};

/// Where the data comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A DB snapshot identifier or ARN.
    Snapshot(String),
    /// A DB instance, restored to `time` (RFC 3339), or to its latest
    /// restorable time when `None`.
    PointInTime {
        instance: String,
        time: Option<String>,
    },
}

/// A database to restore.
#[derive(Clone, Debug)]
pub struct Spec {
    /// `mysql`, `mariadb`, `postgres`, ...: checked against the source's.
    pub engine: String,
    pub source: Source,
    pub instance_class: String,
    /// The network to place it in; the account's default VPC when `None`.
    pub network: Option<crate::ec2::Layout>,
    pub port: Option<u16>,
}

/// What [`restore`] made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Database {
    pub id: String,
    pub arn: String,
    pub address: String,
    pub port: u16,
    pub engine: String,
    pub instance_class: String,
}

fn tags(key: &str) -> Vec<Tag> {
    vec![
        Tag::builder().key(TAG_RUN).value(run_of(key)).build(),
        Tag::builder().key(TAG_KEY).value(key).build(),
        Tag::builder()
            .key("Name")
            .value(crate::display_name(key))
            .build(),
    ]
}

/// Engine names as RDS spells them (`postgresql` is `postgres`).
fn engine_name(e: &str) -> String {
    match e.trim().to_ascii_lowercase().as_str() {
        "postgresql" | "pg" => "postgres".into(),
        other => other.to_owned(),
    }
}

async fn describe(aws: &Aws, id: &str) -> Result<Option<DbInstance>> {
    match aws
        .rds
        .describe_db_instances()
        .db_instance_identifier(id)
        .send()
        .await
    {
        Ok(out) => Ok(out.db_instances.unwrap_or_default().into_iter().next()),
        Err(e) => match api_error("DescribeDBInstances", &aws.endpoint, e) {
            e if e.is_not_found() => Ok(None),
            e => Err(e),
        },
    }
}

/// The engine of what `source` names, to check against the spec's before
/// anything is made.
async fn source_engine(aws: &Aws, source: &Source) -> Result<String> {
    let ep = &aws.endpoint;
    match source {
        Source::Snapshot(snap) => {
            let found = aws
                .rds
                .describe_db_snapshots()
                .db_snapshot_identifier(snap)
                .send()
                .await
                .map_err(|e| match api_error("DescribeDBSnapshots", ep, e) {
                    e if e.is_not_found() => Error::Invalid(format!(
                        "there is no DB snapshot {snap} in {}: give an identifier from `aws rds describe-db-snapshots`",
                        aws.region
                    )),
                    e => e,
                })?;
            found
                .db_snapshots
                .unwrap_or_default()
                .into_iter()
                .next()
                .and_then(|s| s.engine)
                .ok_or_else(|| {
                    Error::Invalid(format!("there is no DB snapshot {snap} in {}", aws.region))
                })
        }
        Source::PointInTime { instance, .. } => describe(aws, instance)
            .await?
            .and_then(|i| i.engine)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "there is no DB instance {instance} in {} to restore to a point in time",
                    aws.region
                ))
            }),
    }
}

/// The subnet group of step `key` in `network` (made, or adopted).
async fn ensure_subnet_group(aws: &Aws, key: &str, network: &crate::ec2::Layout) -> Result<String> {
    let ep = &aws.endpoint;
    let name = short_name(key);
    match aws
        .rds
        .describe_db_subnet_groups()
        .db_subnet_group_name(&name)
        .send()
        .await
    {
        Ok(_) => return Ok(name),
        Err(e) => {
            let e = api_error("DescribeDBSubnetGroups", ep, e);
            if !e.is_not_found() {
                return Err(e);
            }
        }
    }
    let made = aws
        .rds
        .create_db_subnet_group()
        .db_subnet_group_name(&name)
        .db_subnet_group_description(format!("Ferry: {key}"))
        .set_subnet_ids(Some(
            network.subnets.iter().map(|(s, _)| s.clone()).collect(),
        ))
        .set_tags(Some(tags(key)))
        .send()
        .await;
    match made {
        Ok(_) => Ok(name),
        Err(e) => match api_error("CreateDBSubnetGroup", ep, e) {
            e if e.code() == Some("DBSubnetGroupAlreadyExists") => Ok(name),
            e => Err(e),
        },
    }
}

/// Restores the database of step `key` (or adopts the one an earlier try
/// started), and waits up to `wait` until it is available.
pub async fn restore(aws: &Aws, key: &str, spec: &Spec, wait: Duration) -> Result<Database> {
    let ep = &aws.endpoint;
    let id = short_name(key);
    if describe(aws, &id).await?.is_none() {
        let have = engine_name(&source_engine(aws, &spec.source).await?);
        let want = engine_name(&spec.engine);
        if have != want {
            return Err(Error::Invalid(format!(
                "the source holds a {have} database, and the step asks for `engine: {}`: make them agree",
                spec.engine
            )));
        }
        let group = match &spec.network {
            Some(n) if n.zone_count() < 2 => {
                return Err(Error::Invalid(format!(
                    "an RDS database needs subnets in two availability zones, and network {} has {} zone(s): give its network.create two `subnets` (and no `zone` setting on the target)",
                    n.vpc_id,
                    n.zone_count()
                )));
            }
            Some(n) => Some((
                ensure_subnet_group(aws, key, n).await?,
                n.security_groups.clone(),
            )),
            None => None,
        };
        let port = spec.port.map(i32::from);
        let made = match &spec.source {
            Source::Snapshot(snap) => {
                let mut req = aws
                    .rds
                    .restore_db_instance_from_db_snapshot()
                    .db_instance_identifier(&id)
                    .db_snapshot_identifier(snap)
                    .db_instance_class(&spec.instance_class)
                    .engine(&want)
                    .publicly_accessible(false)
                    .set_port(port)
                    .set_tags(Some(tags(key)));
                if let Some((group, sgs)) = &group {
                    req = req
                        .db_subnet_group_name(group)
                        .set_vpc_security_group_ids(Some(sgs.clone()));
                }
                req.send()
                    .await
                    .map(|_| ())
                    .map_err(|e| api_error("RestoreDBInstanceFromDBSnapshot", ep, e))
            }
            Source::PointInTime { instance, time } => {
                let mut req = aws
                    .rds
                    .restore_db_instance_to_point_in_time()
                    .source_db_instance_identifier(instance)
                    .target_db_instance_identifier(&id)
                    .db_instance_class(&spec.instance_class)
                    .engine(&want)
                    .publicly_accessible(false)
                    .set_port(port)
                    .set_tags(Some(tags(key)));
                req = match time {
                    None => req.use_latest_restorable_time(true),
                    Some(t) => req.restore_time(
                        aws_smithy_types::DateTime::from_str(
                            t,
                            aws_smithy_types::date_time::Format::DateTime,
                        )
                        .map_err(|e| {
                            Error::Invalid(format!(
                                "point in time `{t}` is not an RFC 3339 time: {e}"
                            ))
                        })?,
                    ),
                };
                if let Some((group, sgs)) = &group {
                    req = req
                        .db_subnet_group_name(group)
                        .set_vpc_security_group_ids(Some(sgs.clone()));
                }
                req.send()
                    .await
                    .map(|_| ())
                    .map_err(|e| api_error("RestoreDBInstanceToPointInTime", ep, e))
            }
        };
        match made {
            Ok(()) => {}
            // Another try got there first: adopt it below.
            Err(e) if e.code() == Some("DBInstanceAlreadyExists") => {}
            Err(e) => return Err(e),
        }
    }
    wait_available(aws, &id, wait).await
}

async fn wait_available(aws: &Aws, id: &str, wait: Duration) -> Result<Database> {
    let until = Instant::now() + wait;
    loop {
        let Some(db) = describe(aws, id).await? else {
            return Err(Error::State(format!(
                "DB instance {id} vanished while it was restored"
            )));
        };
        let status = db.db_instance_status.clone().unwrap_or_default();
        match status.as_str() {
            "available" => {
                let endpoint = db
                    .endpoint
                    .clone()
                    .unwrap_or_else(|| aws_sdk_rds::types::Endpoint::builder().build());
                return Ok(Database {
                    id: id.to_owned(),
                    arn: db.db_instance_arn.unwrap_or_default(),
                    address: endpoint.address.unwrap_or_default(),
                    port: endpoint
                        .port
                        .and_then(|p| u16::try_from(p).ok())
                        .unwrap_or_default(),
                    engine: db.engine.unwrap_or_default(),
                    instance_class: db.db_instance_class.unwrap_or_default(),
                });
            }
            "failed"
            | "incompatible-restore"
            | "incompatible-parameters"
            | "incompatible-network"
            | "storage-full"
            | "inaccessible-encryption-credentials"
            | "restore-error" => {
                return Err(Error::State(format!(
                    "DB instance {id} is {status}: see its events in the RDS console; the undo deletes it"
                )));
            }
            _ if Instant::now() >= until => {
                return Err(Error::Api {
                    call: "DescribeDBInstances",
                    endpoint: aws.endpoint.clone(),
                    code: None,
                    message: format!(
                        "DB instance {id} is still {status} after {}s",
                        wait.as_secs()
                    ),
                    transient: true,
                });
            }
            _ => tokio::time::sleep(Duration::from_secs(10)).await,
        }
    }
}

/// Deletes the database step `key` restored (no final snapshot), waits up
/// to `wait` until it is gone, then deletes its subnet group. Nothing there
/// is success.
pub async fn delete(aws: &Aws, key: &str, wait: Duration) -> Result<()> {
    let id = short_name(key);
    delete_instance(aws, &id, wait).await?;
    delete_subnet_group(aws, &id).await
}

async fn delete_instance(aws: &Aws, id: &str, wait: Duration) -> Result<()> {
    let Some(db) = describe(aws, id).await? else {
        return Ok(());
    };
    if db.db_instance_status.as_deref() != Some("deleting") {
        let r = aws
            .rds
            .delete_db_instance()
            .db_instance_identifier(id)
            .skip_final_snapshot(true)
            .delete_automated_backups(true)
            .send()
            .await;
        if let Err(e) = r {
            let e = api_error("DeleteDBInstance", &aws.endpoint, e);
            // Already being deleted (or gone) is what we want.
            if !e.is_not_found()
                && !e
                    .code()
                    .is_some_and(|c| c.starts_with("InvalidDBInstanceState"))
            {
                return Err(e);
            }
        }
    }
    let until = Instant::now() + wait;
    while describe(aws, id).await?.is_some() {
        if Instant::now() >= until {
            return Err(Error::Api {
                call: "DescribeDBInstances",
                endpoint: aws.endpoint.clone(),
                code: None,
                message: format!(
                    "DB instance {id} is still being deleted after {}s",
                    wait.as_secs()
                ),
                transient: true,
            });
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    Ok(())
}

async fn delete_subnet_group(aws: &Aws, name: &str) -> Result<()> {
    match aws
        .rds
        .delete_db_subnet_group()
        .db_subnet_group_name(name)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => match api_error("DeleteDBSubnetGroup", &aws.endpoint, e) {
            e if e.is_not_found() => Ok(()),
            e => Err(e),
        },
    }
}

/// Whether the RDS resource `arn` carries run `run`'s tag (`tags` when
/// the listing returned them, else asked for).
async fn tagged_with_run(aws: &Aws, arn: &str, tags: Option<Vec<Tag>>, run: &str) -> Result<bool> {
    let tags = match tags {
        Some(t) if !t.is_empty() => t,
        _ => aws
            .rds
            .list_tags_for_resource()
            .resource_name(arn)
            .send()
            .await
            .map_err(|e| api_error("ListTagsForResource", &aws.endpoint, e))?
            .tag_list
            .unwrap_or_default(),
    };
    Ok(tags
        .iter()
        .any(|t| t.key.as_deref() == Some(TAG_RUN) && t.value.as_deref() == Some(run)))
}

/// Run `run`'s DB instances and subnet groups: found by the run's name
/// prefix, confirmed by its tag.
async fn of_run(aws: &Aws, run: &str) -> Result<(Vec<String>, Vec<String>)> {
    let ep = &aws.endpoint;
    let prefix = run_prefix(run);
    let mut instances = Vec::new();
    let mut marker = None;
    loop {
        let page = aws
            .rds
            .describe_db_instances()
            .set_marker(marker)
            .send()
            .await
            .map_err(|e| api_error("DescribeDBInstances", ep, e))?;
        for db in page.db_instances.unwrap_or_default() {
            let Some(id) = db.db_instance_identifier.clone() else {
                continue;
            };
            if id.starts_with(&prefix)
                && tagged_with_run(
                    aws,
                    db.db_instance_arn.as_deref().unwrap_or_default(),
                    db.tag_list,
                    run,
                )
                .await?
            {
                instances.push(id);
            }
        }
        match page.marker {
            Some(m) if !m.is_empty() => marker = Some(m),
            _ => break,
        }
    }
    let mut groups = Vec::new();
    let mut marker = None;
    loop {
        let page = aws
            .rds
            .describe_db_subnet_groups()
            .set_marker(marker)
            .send()
            .await
            .map_err(|e| api_error("DescribeDBSubnetGroups", ep, e))?;
        for g in page.db_subnet_groups.unwrap_or_default() {
            let Some(name) = g.db_subnet_group_name.clone() else {
                continue;
            };
            if name.starts_with(&prefix)
                && tagged_with_run(
                    aws,
                    g.db_subnet_group_arn.as_deref().unwrap_or_default(),
                    None,
                    run,
                )
                .await?
            {
                groups.push(name);
            }
        }
        match page.marker {
            Some(m) if !m.is_empty() => marker = Some(m),
            _ => break,
        }
    }
    Ok((instances, groups))
}

/// Run `run`'s databases and subnet groups, as `kind id` lines.
pub async fn list_run(aws: &Aws, run: &str) -> Result<Vec<String>> {
    let (instances, groups) = of_run(aws, run).await?;
    Ok(instances
        .into_iter()
        .map(|i| format!("database {i}"))
        .chain(groups.into_iter().map(|g| format!("dbsubnetgroup {g}")))
        .collect())
}

/// Deletes run `run`'s databases, then their subnet groups.
pub async fn teardown(aws: &Aws, run: &str) -> Result<()> {
    let (instances, groups) = of_run(aws, run).await?;
    for id in &instances {
        delete_instance(aws, id, Duration::from_secs(3600)).await?;
    }
    for g in &groups {
        delete_subnet_group(aws, g).await?;
    }
    Ok(())
}

/// The built-in DB instance class table: `(class, vCPUs, MiB)`.
pub fn default_classes() -> crate::ec2::Sizes {
    [
        ("db.t3.micro", 2, 1024),
        ("db.t3.small", 2, 2048),
        ("db.t3.medium", 2, 4096),
        ("db.m6i.large", 2, 8192),
        ("db.m6i.xlarge", 4, 16384),
        ("db.m6i.2xlarge", 8, 32768),
        ("db.m6i.4xlarge", 16, 65536),
        ("db.r6i.4xlarge", 16, 131072),
        ("db.m6i.16xlarge", 64, 262144),
    ]
    .into_iter()
    .map(|(t, c, m)| (t.to_owned(), c, m))
    .collect()
}

/// The calls real work makes, read-only: RDS answers.
pub async fn health(aws: &Aws) -> Result<String> {
    aws.rds
        .describe_db_instances()
        .max_records(20)
        .send()
        .await
        .map(|_| "DB instances listed".to_owned())
        .map_err(|e| api_error("DescribeDBInstances", &aws.endpoint, e))
}
