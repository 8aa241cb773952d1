//! EC2 resources a run makes: isolated networks (a VPC with subnets, a
//! security group and its own route table), images registered from restored
//! snapshots, instances, and empty volumes; and the teardown of all of them
//! by the run's tag.
//!
//! Every create first looks for what an earlier try of the same step made
//! (by the [`TAG_KEY`] tag, which EC2 applies atomically with the create
//! through `TagSpecifications`) and adopts it; creates that take a client
//! token (`RunInstances`, `CreateVolume`) carry one derived from the key as
//! well. Every delete treats "not found" as done.

use crate::{Aws, Error, Result, TAG_KEY, TAG_RUN, api_error, client_token, display_name, run_of};
use aws_sdk_ec2::types::{
    ArchitectureValues, BlockDeviceMapping, EbsBlockDevice, Filter, InstanceStateName,
    InstanceType, IpPermission, IpRange, ResourceType, Tag, TagSpecification, VolumeType,
};
use std::time::Duration;

fn tags(key: &str, kind: ResourceType, extra: &[(&str, &str)]) -> TagSpecification {
    let mut b = TagSpecification::builder()
        .resource_type(kind)
        .tags(Tag::builder().key(TAG_RUN).value(run_of(key)).build())
        .tags(Tag::builder().key(TAG_KEY).value(key).build())
        .tags(Tag::builder().key("Name").value(display_name(key)).build());
    for (k, v) in extra {
        b = b.tags(Tag::builder().key(*k).value(*v).build());
    }
    b.build()
}

fn by_tag(tag: &str, value: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{tag}"))
        .values(value)
        .build()
}

/// Treats "already gone" as done.
fn gone_ok(r: Result<()>) -> Result<()> {
    match r {
        Err(e) if e.is_not_found() => Ok(()),
        r => r,
    }
}

/// An inbound rule: `tcp/80 from 10.0.0.0/16`, `tcp/22`, `udp/53 from
/// 0.0.0.0/0`, `icmp`. Without `from`, the rule admits the network itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ingress {
    pub protocol: String,
    pub port: Option<u16>,
    pub from: Option<String>,
}

impl Ingress {
    pub fn parse(s: &str) -> Result<Ingress> {
        let bad = || {
            Error::Invalid(format!(
                "firewall rule `{s}`: write PROTO/PORT [from CIDR], e.g. `tcp/80 from 10.0.0.0/16`"
            ))
        };
        let (spec, from) = match s.split_once(" from ") {
            Some((a, b)) => (a.trim(), Some(b.trim().to_owned())),
            None => (s.trim(), None),
        };
        let (protocol, port) = match spec.split_once('/') {
            Some((p, port)) => (p, Some(port.parse::<u16>().map_err(|_| bad())?)),
            None => (spec, None),
        };
        if !matches!(protocol, "tcp" | "udp" | "icmp") || (protocol != "icmp" && port.is_none()) {
            return Err(bad());
        }
        if let Some(f) = &from
            && !f.contains('/')
        {
            return Err(bad());
        }
        Ok(Ingress {
            protocol: protocol.into(),
            port,
            from,
        })
    }
}

/// A network to make: a VPC, a subnet per CIDR, a security group with the
/// given ingress, and a route table of its own with no route out (a drill's
/// network reaches nothing but itself).
#[derive(Clone, Debug)]
pub struct NetworkSpec {
    pub cidr: String,
    pub subnets: Vec<String>,
    pub ingress: Vec<Ingress>,
    /// One availability zone for every subnet. Default: the subnets are
    /// spread over the region's zones in turn, since an application load
    /// balancer and an RDS subnet group each need two zones.
    pub zone: Option<String>,
}

/// What [`create_network`] made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Network {
    pub vpc_id: String,
    pub subnet_ids: Vec<String>,
    pub security_group_id: String,
    pub route_table_id: String,
    pub zone: String,
}

/// The region's first availability zone (by name).
pub async fn first_zone(aws: &Aws) -> Result<String> {
    zones(aws)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| Error::State(format!("region {} lists no availability zone", aws.region)))
}

/// The region's availability zones, by name.
pub async fn zones(aws: &Aws) -> Result<Vec<String>> {
    let out = aws
        .ec2
        .describe_availability_zones()
        .send()
        .await
        .map_err(|e| api_error("DescribeAvailabilityZones", &aws.endpoint, e))?;
    let mut zones: Vec<String> = out
        .availability_zones
        .unwrap_or_default()
        .into_iter()
        .filter(|z| {
            z.zone_type
                .as_deref()
                .is_none_or(|t| t == "availability-zone")
        })
        .filter_map(|z| z.zone_name)
        .collect();
    zones.sort();
    Ok(zones)
}

async fn vpc_of(aws: &Aws, key: &str) -> Result<Option<String>> {
    let out = aws
        .ec2
        .describe_vpcs()
        .filters(by_tag(TAG_KEY, key))
        .send()
        .await
        .map_err(|e| api_error("DescribeVpcs", &aws.endpoint, e))?;
    Ok(out
        .vpcs
        .unwrap_or_default()
        .into_iter()
        .find_map(|v| v.vpc_id))
}

/// Makes (or adopts) the network of step `key`.
pub async fn create_network(aws: &Aws, key: &str, spec: &NetworkSpec) -> Result<Network> {
    let ep = &aws.endpoint;
    let zones = match &spec.zone {
        Some(z) => vec![z.clone()],
        None => zones(aws).await?,
    };
    let Some(zone) = zones.first().cloned() else {
        return Err(Error::State(format!(
            "region {} lists no availability zone",
            aws.region
        )));
    };
    let vpc_id = match vpc_of(aws, key).await? {
        Some(id) => id,
        None => aws
            .ec2
            .create_vpc()
            .cidr_block(&spec.cidr)
            .tag_specifications(tags(key, ResourceType::Vpc, &[]))
            .send()
            .await
            .map_err(|e| api_error("CreateVpc", ep, e))?
            .vpc
            .and_then(|v| v.vpc_id)
            .ok_or_else(|| Error::State("CreateVpc returned no VPC".into()))?,
    };
    let in_vpc = || Filter::builder().name("vpc-id").values(&vpc_id).build();

    let existing = aws
        .ec2
        .describe_subnets()
        .filters(in_vpc())
        .send()
        .await
        .map_err(|e| api_error("DescribeSubnets", ep, e))?
        .subnets
        .unwrap_or_default();
    let cidrs = if spec.subnets.is_empty() {
        vec![spec.cidr.clone()]
    } else {
        spec.subnets.clone()
    };
    let mut subnet_ids = Vec::new();
    for (i, cidr) in cidrs.iter().enumerate() {
        if let Some(id) = existing
            .iter()
            .find(|s| s.cidr_block.as_deref() == Some(cidr.as_str()))
            .and_then(|s| s.subnet_id.clone())
        {
            subnet_ids.push(id);
            continue;
        }
        let id = aws
            .ec2
            .create_subnet()
            .vpc_id(&vpc_id)
            .cidr_block(cidr)
            .availability_zone(&zones[i % zones.len()])
            .tag_specifications(tags(key, ResourceType::Subnet, &[]))
            .send()
            .await
            .map_err(|e| api_error("CreateSubnet", ep, e))?
            .subnet
            .and_then(|s| s.subnet_id)
            .ok_or_else(|| Error::State("CreateSubnet returned no subnet".into()))?;
        subnet_ids.push(id);
    }

    let sg_name = display_name(key);
    let groups = aws
        .ec2
        .describe_security_groups()
        .filters(in_vpc())
        .filters(
            Filter::builder()
                .name("group-name")
                .values(&sg_name)
                .build(),
        )
        .send()
        .await
        .map_err(|e| api_error("DescribeSecurityGroups", ep, e))?
        .security_groups
        .unwrap_or_default();
    let security_group_id = match groups.into_iter().find_map(|g| g.group_id) {
        Some(id) => id,
        None => aws
            .ec2
            .create_security_group()
            .vpc_id(&vpc_id)
            .group_name(&sg_name)
            .description(format!("Ferry: {key}"))
            .tag_specifications(tags(key, ResourceType::SecurityGroup, &[]))
            .send()
            .await
            .map_err(|e| api_error("CreateSecurityGroup", ep, e))?
            .group_id
            .ok_or_else(|| Error::State("CreateSecurityGroup returned no group".into()))?,
    };
    for rule in &spec.ingress {
        let from = rule.from.clone().unwrap_or_else(|| spec.cidr.clone());
        let port = rule.port.map_or(-1, i32::from);
        let perm = IpPermission::builder()
            .ip_protocol(&rule.protocol)
            .from_port(port)
            .to_port(port)
            .ip_ranges(IpRange::builder().cidr_ip(from).build())
            .build();
        match aws
            .ec2
            .authorize_security_group_ingress()
            .group_id(&security_group_id)
            .ip_permissions(perm)
            .send()
            .await
        {
            Ok(_) => {}
            Err(e) => {
                let e = api_error("AuthorizeSecurityGroupIngress", ep, e);
                if e.code() != Some("InvalidPermission.Duplicate") {
                    return Err(e);
                }
            }
        }
    }

    let tables = aws
        .ec2
        .describe_route_tables()
        .filters(by_tag(TAG_KEY, key))
        .send()
        .await
        .map_err(|e| api_error("DescribeRouteTables", ep, e))?
        .route_tables
        .unwrap_or_default();
    let (route_table_id, associated): (String, Vec<String>) = match tables.into_iter().next() {
        Some(t) => (
            t.route_table_id.unwrap_or_default(),
            t.associations
                .unwrap_or_default()
                .into_iter()
                .filter_map(|a| a.subnet_id)
                .collect(),
        ),
        None => (
            aws.ec2
                .create_route_table()
                .vpc_id(&vpc_id)
                .tag_specifications(tags(key, ResourceType::RouteTable, &[]))
                .send()
                .await
                .map_err(|e| api_error("CreateRouteTable", ep, e))?
                .route_table
                .and_then(|t| t.route_table_id)
                .ok_or_else(|| Error::State("CreateRouteTable returned no table".into()))?,
            Vec::new(),
        ),
    };
    for subnet in subnet_ids.iter().filter(|s| !associated.contains(s)) {
        aws.ec2
            .associate_route_table()
            .route_table_id(&route_table_id)
            .subnet_id(subnet)
            .send()
            .await
            .map_err(|e| api_error("AssociateRouteTable", ep, e))?;
    }
    Ok(Network {
        vpc_id,
        subnet_ids,
        security_group_id,
        route_table_id,
        zone,
    })
}

/// The subnet (the first by id) and the security groups other than
/// `default` of VPC `vpc`: where an instance joining that network goes.
pub async fn network_parts(aws: &Aws, vpc: &str) -> Result<(String, Vec<String>)> {
    let ep = &aws.endpoint;
    let in_vpc = || Filter::builder().name("vpc-id").values(vpc).build();
    let mut subnets: Vec<String> = aws
        .ec2
        .describe_subnets()
        .filters(in_vpc())
        .send()
        .await
        .map_err(|e| api_error("DescribeSubnets", ep, e))?
        .subnets
        .unwrap_or_default()
        .into_iter()
        .filter_map(|s| s.subnet_id)
        .collect();
    subnets.sort();
    let Some(subnet) = subnets.into_iter().next() else {
        return Err(Error::Invalid(format!(
            "network {vpc} has no subnet (was it made by network.create?)"
        )));
    };
    let groups = aws
        .ec2
        .describe_security_groups()
        .filters(in_vpc())
        .send()
        .await
        .map_err(|e| api_error("DescribeSecurityGroups", ep, e))?
        .security_groups
        .unwrap_or_default()
        .into_iter()
        .filter(|g| g.group_name.as_deref() != Some("default"))
        .filter_map(|g| g.group_id)
        .collect();
    Ok((subnet, groups))
}

/// Where a load balancer or a database joining network `vpc` goes: its
/// subnets with their zones (sorted by subnet id), and its security groups
/// other than `default`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    pub vpc_id: String,
    /// `(subnet id, availability zone)`.
    pub subnets: Vec<(String, String)>,
    pub security_groups: Vec<String>,
}

impl Layout {
    /// One subnet per availability zone (the first of each): what ELBv2
    /// accepts.
    pub fn one_per_zone(&self) -> Vec<String> {
        let mut seen = std::collections::BTreeSet::new();
        self.subnets
            .iter()
            .filter(|(_, z)| seen.insert(z.clone()))
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// How many availability zones its subnets cover.
    pub fn zone_count(&self) -> usize {
        self.subnets
            .iter()
            .map(|(_, z)| z)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    }
}

/// The [`Layout`] of VPC `vpc`.
pub async fn layout(aws: &Aws, vpc: &str) -> Result<Layout> {
    let ep = &aws.endpoint;
    let in_vpc = || Filter::builder().name("vpc-id").values(vpc).build();
    let mut subnets: Vec<(String, String)> = aws
        .ec2
        .describe_subnets()
        .filters(in_vpc())
        .send()
        .await
        .map_err(|e| match api_error("DescribeSubnets", ep, e) {
            e if e.is_not_found() => Error::Invalid(format!(
                "network {vpc} does not exist (is it a network.create output `id` of this run?)"
            )),
            e => e,
        })?
        .subnets
        .unwrap_or_default()
        .into_iter()
        .filter_map(|s| Some((s.subnet_id?, s.availability_zone.unwrap_or_default())))
        .collect();
    subnets.sort();
    if subnets.is_empty() {
        return Err(Error::Invalid(format!(
            "network {vpc} has no subnet (is it a network.create output `id`?)"
        )));
    }
    let security_groups = aws
        .ec2
        .describe_security_groups()
        .filters(in_vpc())
        .send()
        .await
        .map_err(|e| api_error("DescribeSecurityGroups", ep, e))?
        .security_groups
        .unwrap_or_default()
        .into_iter()
        .filter(|g| g.group_name.as_deref() != Some("default"))
        .filter_map(|g| g.group_id)
        .collect();
    Ok(Layout {
        vpc_id: vpc.to_owned(),
        subnets,
        security_groups,
    })
}

/// Deletes the network of step `key` and everything in it Ferry made;
/// what is already gone is skipped.
pub async fn delete_network(aws: &Aws, key: &str) -> Result<()> {
    if let Some(vpc) = vpc_of(aws, key).await? {
        delete_vpc(aws, &vpc).await?;
    }
    Ok(())
}

async fn delete_vpc(aws: &Aws, vpc: &str) -> Result<()> {
    let ep = &aws.endpoint;
    let in_vpc = || Filter::builder().name("vpc-id").values(vpc).build();
    // Instances still in it would keep its subnets: terminate them first.
    let ids = instances_where(aws, in_vpc()).await?;
    terminate_and_wait(aws, &ids).await?;
    let tables = aws
        .ec2
        .describe_route_tables()
        .filters(in_vpc())
        .send()
        .await
        .map_err(|e| api_error("DescribeRouteTables", ep, e))?
        .route_tables
        .unwrap_or_default();
    for t in tables {
        let main = t
            .associations
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|a| a.main == Some(true));
        for a in t.associations.unwrap_or_default() {
            if a.main == Some(true) {
                continue;
            }
            if let Some(id) = a.route_table_association_id {
                gone_ok(
                    aws.ec2
                        .disassociate_route_table()
                        .association_id(id)
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(|e| api_error("DisassociateRouteTable", ep, e)),
                )?;
            }
        }
        if !main && let Some(id) = t.route_table_id {
            gone_ok(
                aws.ec2
                    .delete_route_table()
                    .route_table_id(id)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| api_error("DeleteRouteTable", ep, e)),
            )?;
        }
    }
    let groups = aws
        .ec2
        .describe_security_groups()
        .filters(in_vpc())
        .send()
        .await
        .map_err(|e| api_error("DescribeSecurityGroups", ep, e))?
        .security_groups
        .unwrap_or_default();
    for g in groups {
        if g.group_name.as_deref() == Some("default") {
            continue;
        }
        if let Some(id) = g.group_id {
            gone_ok(
                aws.ec2
                    .delete_security_group()
                    .group_id(id)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| api_error("DeleteSecurityGroup", ep, e)),
            )?;
        }
    }
    let subnets = aws
        .ec2
        .describe_subnets()
        .filters(in_vpc())
        .send()
        .await
        .map_err(|e| api_error("DescribeSubnets", ep, e))?
        .subnets
        .unwrap_or_default();
    for s in subnets {
        if let Some(id) = s.subnet_id {
            gone_ok(
                aws.ec2
                    .delete_subnet()
                    .subnet_id(id)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| api_error("DeleteSubnet", ep, e)),
            )?;
        }
    }
    gone_ok(
        aws.ec2
            .delete_vpc()
            .vpc_id(vpc)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| api_error("DeleteVpc", ep, e)),
    )
}

/// An instance size table: `(type, vcpus, MiB)`.
pub type Sizes = Vec<(String, u32, u32)>;

/// Instance sizes: the smallest of `table` with at least the cpus and
/// memory asked for. `table` lists `(type, vcpus, MiB)`.
pub fn pick_instance_type(
    table: &[(String, u32, u32)],
    cpus: u32,
    memory_mib: u32,
) -> Option<&str> {
    table
        .iter()
        .filter(|(_, c, m)| *c >= cpus && *m >= memory_mib)
        .min_by_key(|(_, c, m)| (*m, *c))
        .map(|(t, _, _)| t.as_str())
}

/// The built-in size table (current general-purpose x86 types, on-demand).
pub fn default_sizes() -> Sizes {
    [
        ("t3.micro", 2, 1024),
        ("t3.small", 2, 2048),
        ("t3.medium", 2, 4096),
        ("m6i.large", 2, 8192),
        ("m6i.xlarge", 4, 16384),
        ("m6i.2xlarge", 8, 32768),
        ("m6i.4xlarge", 16, 65536),
        ("r6i.4xlarge", 16, 131072),
        ("m6i.16xlarge", 64, 262144),
    ]
    .into_iter()
    .map(|(t, c, m)| (t.to_owned(), c, m))
    .collect()
}

/// An instance to launch.
#[derive(Clone, Debug)]
pub struct InstanceSpec {
    pub instance_type: String,
    /// An image (AMI) to boot; `None`: boot the first of `snapshots`.
    pub image: Option<String>,
    /// Restored disks, in order: the boot disk first when `image` is `None`.
    pub snapshots: Vec<String>,
    pub subnet_id: Option<String>,
    pub security_group_ids: Vec<String>,
    pub user_data: Option<String>,
}

/// What [`launch`] made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub instance_id: String,
    pub image_id: String,
    pub private_ip: Option<String>,
    pub state: String,
}

async fn instances_where(aws: &Aws, filter: Filter) -> Result<Vec<String>> {
    let out = aws
        .ec2
        .describe_instances()
        .filters(filter)
        .send()
        .await
        .map_err(|e| api_error("DescribeInstances", &aws.endpoint, e))?;
    Ok(out
        .reservations
        .unwrap_or_default()
        .into_iter()
        .flat_map(|r| r.instances.unwrap_or_default())
        .filter(|i| {
            !matches!(
                i.state.as_ref().and_then(|s| s.name.as_ref()),
                Some(InstanceStateName::Terminated | InstanceStateName::ShuttingDown)
            )
        })
        .filter_map(|i| i.instance_id)
        .collect())
}

async fn describe_instance(aws: &Aws, id: &str) -> Result<Option<aws_sdk_ec2::types::Instance>> {
    match aws.ec2.describe_instances().instance_ids(id).send().await {
        Ok(out) => Ok(out
            .reservations
            .unwrap_or_default()
            .into_iter()
            .flat_map(|r| r.instances.unwrap_or_default())
            .next()),
        Err(e) => {
            let e = api_error("DescribeInstances", &aws.endpoint, e);
            if e.is_not_found() { Ok(None) } else { Err(e) }
        }
    }
}

/// The image that boots `snapshot`, registered once per step.
async fn image_from_snapshot(aws: &Aws, key: &str, snapshot: &str) -> Result<String> {
    let ep = &aws.endpoint;
    let name = display_name(key);
    let found = aws
        .ec2
        .describe_images()
        .owners("self")
        .filters(Filter::builder().name("name").values(&name).build())
        .send()
        .await
        .map_err(|e| api_error("DescribeImages", ep, e))?
        .images
        .unwrap_or_default();
    if let Some(id) = found.into_iter().find_map(|i| i.image_id) {
        return Ok(id);
    }
    let id = aws
        .ec2
        .register_image()
        .name(&name)
        .description(format!("Ferry: boot disk of {key}"))
        .architecture(ArchitectureValues::X8664)
        .virtualization_type("hvm")
        .ena_support(true)
        .root_device_name("/dev/xvda")
        .block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name("/dev/xvda")
                .ebs(
                    EbsBlockDevice::builder()
                        .snapshot_id(snapshot)
                        .delete_on_termination(true)
                        .volume_type(VolumeType::Gp3)
                        .build(),
                )
                .build(),
        )
        .tag_specifications(tags(key, ResourceType::Image, &[]))
        .send()
        .await
        .map_err(|e| api_error("RegisterImage", ep, e))?
        .image_id
        .ok_or_else(|| Error::State("RegisterImage returned no image".into()))?;
    Ok(id)
}

/// Launches the instance of step `key`, or adopts the one an earlier try
/// launched; waits until it runs.
pub async fn launch(aws: &Aws, key: &str, spec: &InstanceSpec, wait: Duration) -> Result<Instance> {
    let ep = &aws.endpoint;
    let (image_id, data) = match (&spec.image, spec.snapshots.split_first()) {
        (Some(image), _) => (image.clone(), spec.snapshots.as_slice()),
        (None, Some((boot, rest))) => (image_from_snapshot(aws, key, boot).await?, rest),
        (None, None) => {
            return Err(Error::Invalid(
                "an instance needs an image or a restored boot disk".into(),
            ));
        }
    };
    let id = match instances_where(aws, by_tag(TAG_KEY, key))
        .await?
        .into_iter()
        .next()
    {
        Some(id) => id,
        None => {
            let mut req = aws
                .ec2
                .run_instances()
                .image_id(&image_id)
                .instance_type(InstanceType::from(spec.instance_type.as_str()))
                .min_count(1)
                .max_count(1)
                .client_token(client_token(key, "instance"))
                .tag_specifications(tags(key, ResourceType::Instance, &[]))
                .tag_specifications(tags(key, ResourceType::Volume, &[]));
            for (i, snap) in data.iter().enumerate() {
                // /dev/sdf, /dev/sdg, ...: the names EC2 recommends for data volumes.
                let letter = char::from(b'f' + (i as u8).min(20));
                req = req.block_device_mappings(
                    BlockDeviceMapping::builder()
                        .device_name(format!("/dev/sd{letter}"))
                        .ebs(
                            EbsBlockDevice::builder()
                                .snapshot_id(snap)
                                .delete_on_termination(true)
                                .volume_type(VolumeType::Gp3)
                                .build(),
                        )
                        .build(),
                );
            }
            if let Some(subnet) = &spec.subnet_id {
                req = req.subnet_id(subnet);
            }
            for sg in &spec.security_group_ids {
                req = req.security_group_ids(sg);
            }
            if let Some(u) = &spec.user_data {
                use base64::Engine as _;
                req = req.user_data(base64::engine::general_purpose::STANDARD.encode(u));
            }
            req.send()
                .await
                .map_err(|e| api_error("RunInstances", ep, e))?
                .instances
                .unwrap_or_default()
                .into_iter()
                .find_map(|i| i.instance_id)
                .ok_or_else(|| Error::State("RunInstances returned no instance".into()))?
        }
    };
    let until = std::time::Instant::now() + wait;
    loop {
        let Some(i) = describe_instance(aws, &id).await? else {
            return Err(Error::State(format!("instance {id} vanished after launch")));
        };
        let state = i
            .state
            .as_ref()
            .and_then(|s| s.name.as_ref())
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default();
        match state.as_str() {
            "running" => {
                return Ok(Instance {
                    instance_id: id,
                    image_id,
                    private_ip: i.private_ip_address,
                    state,
                });
            }
            "pending" if std::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            other => {
                return Err(Error::State(format!(
                    "instance {id} is {other} {}s after launch",
                    wait.as_secs()
                )));
            }
        }
    }
}

/// Stops an instance; one not running (or gone) is success.
pub async fn stop(aws: &Aws, instance_id: &str) -> Result<()> {
    gone_ok(
        aws.ec2
            .stop_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| api_error("StopInstances", &aws.endpoint, e)),
    )
}

async fn terminate_and_wait(aws: &Aws, ids: &[String]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    gone_ok(
        aws.ec2
            .terminate_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| api_error("TerminateInstances", &aws.endpoint, e)),
    )?;
    let until = std::time::Instant::now() + Duration::from_secs(600);
    for id in ids {
        loop {
            let state = describe_instance(aws, id)
                .await?
                .and_then(|i| i.state.and_then(|s| s.name));
            match state {
                None | Some(InstanceStateName::Terminated) => break,
                _ if std::time::Instant::now() > until => {
                    return Err(Error::State(format!(
                        "instance {id} is still not terminated after 10 minutes"
                    )));
                }
                _ => tokio::time::sleep(Duration::from_secs(2)).await,
            }
        }
    }
    Ok(())
}

/// Terminates the instance step `key` launched, and deregisters the image
/// registered for it; nothing there is success.
pub async fn terminate(aws: &Aws, key: &str) -> Result<()> {
    let ids = instances_where(aws, by_tag(TAG_KEY, key)).await?;
    terminate_and_wait(aws, &ids).await?;
    deregister_images(aws, by_tag(TAG_KEY, key)).await
}

async fn deregister_images(aws: &Aws, filter: Filter) -> Result<()> {
    let images = aws
        .ec2
        .describe_images()
        .owners("self")
        .filters(filter)
        .send()
        .await
        .map_err(|e| api_error("DescribeImages", &aws.endpoint, e))?
        .images
        .unwrap_or_default();
    for id in images.into_iter().filter_map(|i| i.image_id) {
        gone_ok(
            aws.ec2
                .deregister_image()
                .image_id(id)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| api_error("DeregisterImage", &aws.endpoint, e)),
        )?;
    }
    Ok(())
}

/// An empty volume for step `key` (adopted if an earlier try made it).
pub async fn create_volume(aws: &Aws, key: &str, size_gib: i32, zone: &str) -> Result<String> {
    if let Some(id) = volumes_where(aws, by_tag(TAG_KEY, key))
        .await?
        .into_iter()
        .next()
    {
        return Ok(id);
    }
    aws.ec2
        .create_volume()
        .size(size_gib)
        .availability_zone(zone)
        .volume_type(VolumeType::Gp3)
        .client_token(client_token(key, "volume"))
        .tag_specifications(tags(key, ResourceType::Volume, &[]))
        .send()
        .await
        .map_err(|e| api_error("CreateVolume", &aws.endpoint, e))?
        .volume_id
        .ok_or_else(|| Error::State("CreateVolume returned no volume".into()))
}

async fn volumes_where(aws: &Aws, filter: Filter) -> Result<Vec<String>> {
    Ok(aws
        .ec2
        .describe_volumes()
        .filters(filter)
        .send()
        .await
        .map_err(|e| api_error("DescribeVolumes", &aws.endpoint, e))?
        .volumes
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| v.volume_id)
        .collect())
}

async fn snapshots_where(aws: &Aws, filter: Filter) -> Result<Vec<String>> {
    Ok(aws
        .ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(filter)
        .send()
        .await
        .map_err(|e| api_error("DescribeSnapshots", &aws.endpoint, e))?
        .snapshots
        .unwrap_or_default()
        .into_iter()
        .filter_map(|s| s.snapshot_id)
        .collect())
}

/// Deletes the volumes and snapshots step `key` made; nothing there is
/// success.
pub async fn delete_volumes(aws: &Aws, key: &str) -> Result<()> {
    delete_storage(aws, || by_tag(TAG_KEY, key)).await
}

async fn delete_storage(aws: &Aws, filter: impl Fn() -> Filter) -> Result<()> {
    for id in volumes_where(aws, filter()).await? {
        gone_ok(
            aws.ec2
                .delete_volume()
                .volume_id(id)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| api_error("DeleteVolume", &aws.endpoint, e)),
        )?;
    }
    for id in snapshots_where(aws, filter()).await? {
        crate::ebs::delete_snapshot(aws, &id).await?;
    }
    Ok(())
}

/// The EC2 resources run `run` made that still exist, as `kind id` lines
/// ([`crate::run::list_run`] adds the other services').
pub async fn list_run(aws: &Aws, run: &str) -> Result<Vec<String>> {
    let f = || by_tag(TAG_RUN, run);
    let mut out = Vec::new();
    for id in instances_where(aws, f()).await? {
        out.push(format!("instance {id}"));
    }
    for id in volumes_where(aws, f()).await? {
        out.push(format!("volume {id}"));
    }
    for id in snapshots_where(aws, f()).await? {
        out.push(format!("snapshot {id}"));
    }
    let images = aws
        .ec2
        .describe_images()
        .owners("self")
        .filters(f())
        .send()
        .await
        .map_err(|e| api_error("DescribeImages", &aws.endpoint, e))?
        .images
        .unwrap_or_default();
    for id in images.into_iter().filter_map(|i| i.image_id) {
        out.push(format!("image {id}"));
    }
    let vpcs = aws
        .ec2
        .describe_vpcs()
        .filters(f())
        .send()
        .await
        .map_err(|e| api_error("DescribeVpcs", &aws.endpoint, e))?
        .vpcs
        .unwrap_or_default();
    for id in vpcs.into_iter().filter_map(|v| v.vpc_id) {
        out.push(format!("vpc {id}"));
    }
    Ok(out)
}

/// Removes the EC2 resources run `run` made, found by its tag, in
/// dependency order: instances, images, volumes and snapshots, networks
/// last ([`crate::run::teardown`] removes the other services' first).
pub async fn teardown(aws: &Aws, run: &str) -> Result<()> {
    let f = || by_tag(TAG_RUN, run);
    let ids = instances_where(aws, f()).await?;
    terminate_and_wait(aws, &ids).await?;
    deregister_images(aws, f()).await?;
    delete_storage(aws, f).await?;
    let vpcs = aws
        .ec2
        .describe_vpcs()
        .filters(f())
        .send()
        .await
        .map_err(|e| api_error("DescribeVpcs", &aws.endpoint, e))?
        .vpcs
        .unwrap_or_default();
    for vpc in vpcs.into_iter().filter_map(|v| v.vpc_id) {
        delete_vpc(aws, &vpc).await?;
    }
    Ok(())
}

/// The calls real work makes, without side effects: the credentials are
/// accepted, the region answers, and EC2 would let this identity create a
/// VPC and start an instance (`DryRun`, which AWS answers with
/// `DryRunOperation` when it would have succeeded).
pub async fn health(aws: &Aws) -> Vec<(String, Result<String>)> {
    let mut out = Vec::new();
    out.push((
        "availability zones".to_owned(),
        first_zone(aws).await.map(|z| format!("first zone {z}")),
    ));
    let dry = aws
        .ec2
        .create_vpc()
        .cidr_block("10.255.0.0/16")
        .dry_run(true)
        .send()
        .await;
    out.push((
        "create a VPC (dry run)".to_owned(),
        match dry {
            Ok(_) => Ok("allowed".into()),
            Err(e) => {
                let e = api_error("CreateVpc", &aws.endpoint, e);
                if e.code() == Some("DryRunOperation") {
                    Ok("allowed".into())
                } else {
                    Err(e)
                }
            }
        },
    ));
    out.push((
        "EBS direct".to_owned(),
        aws.ec2
            .describe_snapshots()
            .owner_ids("self")
            .max_results(5)
            .send()
            .await
            .map(|_| "snapshots listed".into())
            .map_err(|e| api_error("DescribeSnapshots", &aws.endpoint, e)),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingress_rules() {
        assert_eq!(
            Ingress::parse("tcp/80 from 10.0.0.0/16").unwrap(),
            Ingress {
                protocol: "tcp".into(),
                port: Some(80),
                from: Some("10.0.0.0/16".into())
            }
        );
        assert_eq!(Ingress::parse("icmp").unwrap().port, None);
        for bad in [
            "tcp",
            "tcp/x",
            "http/80",
            "tcp/80 from somewhere",
            "tcp/70000",
        ] {
            assert!(Ingress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_pick_the_smallest_that_fits() {
        let t = default_sizes();
        assert_eq!(pick_instance_type(&t, 1, 512), Some("t3.micro"));
        assert_eq!(pick_instance_type(&t, 2, 3000), Some("t3.medium"));
        assert_eq!(pick_instance_type(&t, 4, 4096), Some("m6i.xlarge"));
        assert_eq!(pick_instance_type(&t, 128, 1024), None);
    }
}
