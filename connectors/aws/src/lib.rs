//! Ferry's AWS connector: what the `aws` target and `ferry restore --to
//! ebs://` do in an AWS account, with no knowledge of runbooks.
//!
//! - [`ebs`]: a recovery point's disk written straight into an EBS snapshot
//!   through the EBS direct APIs (a [`BlockSink`](ferry_agent::sink::BlockSink)),
//!   resumable after a kill, and read back block by block.
//! - [`source`]: the agentless source: an EBS snapshot read as a
//!   `BlockSource` (incrementals through `ListChangedBlocks`), so an EC2
//!   machine is protected with nothing installed in it.
//! - [`ec2`]: isolated networks (VPC, subnet, security group, route table),
//!   instances launched from restored snapshots, and teardown of everything a
//!   run made, found by its tags.
//! - [`elb`]: ELBv2 load balancers (ALB or NLB) in a network's subnets, a
//!   target group per listener with its health check, targets registered.
//! - [`route53`]: records switched to the rebuilt stack (values, an alias to
//!   a load balancer, or a failover pair with a health check), and put back
//!   as they were on undo.
//! - [`rds`]: RDS instances restored from a DB snapshot or to a point in
//!   time, in a DB subnet group of the network.
//! - [`run`]: everything one run made, across the services, listed and torn
//!   down in dependency order (the outermost module).
//!
//! Credentials come from the SDK's standard chain; the region and the
//! endpoint may be set (the tests point them at moto on 127.0.0.1). Every
//! resource Ferry makes carries the tags [`TAG_RUN`] and [`TAG_KEY`], so a
//! crashed run's resources are found and removed by tag, and every create
//! carries a client token derived from the step's idempotency key, so a
//! retried create returns what the first try made. Services that take no
//! client token (ELBv2, RDS, Route 53 health checks) get a name derived
//! from the key instead ([`short_name`]), which a retry finds and adopts.

pub mod ebs;
pub mod ec2;
pub mod elb;
pub mod rds;
pub mod route53;
pub mod run;
pub mod source;

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
pub use aws_sdk_ec2::types::Filter;

/// The run a resource belongs to.
pub const TAG_RUN: &str = "ferry:run";
/// The step (its idempotency key, `RUN/NODE`) that made a resource.
pub const TAG_KEY: &str = "ferry:key";

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong talking to AWS, with the call and the endpoint named.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// AWS (or the endpoint standing in for it) refused or failed a call.
    #[error("AWS {call} at {endpoint} failed: {message}")]
    Api {
        call: &'static str,
        endpoint: String,
        /// The service's error code (`InvalidVpcID.NotFound`, `Throttling`).
        code: Option<String>,
        message: String,
        /// Worth trying again: throttling, a timeout, a dropped connection,
        /// a 5xx.
        transient: bool,
    },
    /// Ferry's own files (the staging file, the journal of a restore).
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A request that cannot work as given.
    #[error("{0}")]
    Invalid(String),
    /// A resource is in a state the operation cannot use.
    #[error("{0}")]
    State(String),
}

impl Error {
    /// Whether trying the same thing again may succeed.
    pub fn retry(&self) -> bool {
        match self {
            Error::Api { transient, .. } => *transient,
            Error::Io { .. } | Error::Invalid(_) | Error::State(_) => false,
        }
    }

    /// The service's error code, for callers that tolerate some
    /// (`...NotFound` in an undo).
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// What an undo may treat as done: the resource is already gone.
    /// EC2 says `...NotFound`, ELBv2 `LoadBalancerNotFound` and
    /// `TargetGroupNotFound`, RDS `DBInstanceNotFound` and
    /// `DBSubnetGroupNotFoundFault`, Route 53 `NoSuchHealthCheck` and
    /// `NoSuchHostedZone`.
    pub fn is_not_found(&self) -> bool {
        self.code().is_some_and(|c| {
            c.contains("NotFound") || c.starts_with("NoSuch") || c == "ResourceNotFoundException"
        })
    }
}

/// Codes AWS documents as worth retrying (throttling and its own faults).
fn transient_code(code: &str) -> bool {
    matches!(
        code,
        "Throttling"
            | "ThrottlingException"
            | "RequestLimitExceeded"
            | "RequestThrottled"
            | "InternalError"
            | "InternalServerError"
            | "InternalFailure"
            | "ServiceUnavailable"
            | "ServiceUnavailableException"
            | "Unavailable"
            | "RequestTimeout"
            | "RequestTimeoutException"
            | "IncorrectState"
            | "ConcurrentLimitExceededException"
            // Route 53: another change to the zone is still in progress.
            | "PriorRequestNotComplete"
            // ELBv2 and RDS: the resource is busy with an earlier change.
            | "ResourceInUse"
            | "InvalidDBInstanceState"
            | "InvalidDBInstanceStateFault"
    )
}

/// An SDK error as an [`Error`], keeping the service's code and message.
pub(crate) fn api_error<E, R>(call: &'static str, endpoint: &str, e: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let endpoint = endpoint.to_owned();
    match &e {
        SdkError::ServiceError(ctx) => {
            let err = ctx.err();
            let code = err.code().map(str::to_owned);
            let message = match (err.code(), err.message()) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c.to_owned(),
                (None, Some(m)) => m.to_owned(),
                (None, None) => format!("{err}"),
            };
            let transient = code.as_deref().is_some_and(transient_code);
            Error::Api {
                call,
                endpoint,
                code,
                message,
                transient,
            }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Error::Api {
                call,
                endpoint: endpoint.clone(),
                code: None,
                message: format!(
                    "{} (is {endpoint} reachable, and are the region and credentials right?)",
                    aws_sdk_ec2::error::DisplayErrorContext(&e)
                ),
                transient: true,
            }
        }
        _ => Error::Api {
            call,
            endpoint,
            code: None,
            message: format!("{}", aws_sdk_ec2::error::DisplayErrorContext(&e)),
            transient: false,
        },
    }
}

/// Where to reach AWS: unset fields come from the SDK's standard chain
/// (`AWS_REGION`, `AWS_ENDPOINT_URL`, profiles, instance metadata).
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct AwsConfig {
    pub region: Option<String>,
    pub endpoint: Option<String>,
    /// An access key id and secret instead of the standard chain: for tests
    /// against a local stand-in, which cannot set process-wide variables.
    pub static_keys: Option<(String, String)>,
}

impl std::fmt::Debug for AwsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsConfig")
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field(
                "static_keys",
                &self.static_keys.as_ref().map(|(id, _)| (id, "<secret>")),
            )
            .finish()
    }
}

/// The clients of one account and region.
#[derive(Clone, Debug)]
pub struct Aws {
    pub ec2: aws_sdk_ec2::Client,
    pub ebs: aws_sdk_ebs::Client,
    pub elb: aws_sdk_elasticloadbalancingv2::Client,
    pub route53: aws_sdk_route53::Client,
    pub rds: aws_sdk_rds::Client,
    pub region: String,
    /// What errors name: the endpoint, or the region's default one.
    pub endpoint: String,
}

impl Aws {
    /// Loads credentials and builds the clients; makes no call.
    pub async fn connect(cfg: &AwsConfig) -> Result<Aws> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &cfg.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &cfg.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some((id, secret)) = &cfg.static_keys {
            loader = loader.credentials_provider(aws_credential_types::Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "ferry-static-keys",
            ));
        }
        let sdk = loader.load().await;
        let region = sdk.region().map(|r| r.to_string()).ok_or_else(|| {
            Error::Invalid("no AWS region: set `region` on the target, or AWS_REGION".into())
        })?;
        let endpoint = sdk
            .endpoint_url()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("AWS {region}"));
        Ok(Aws {
            ec2: aws_sdk_ec2::Client::new(&sdk),
            ebs: aws_sdk_ebs::Client::new(&sdk),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(&sdk),
            route53: aws_sdk_route53::Client::new(&sdk),
            rds: aws_sdk_rds::Client::new(&sdk),
            region,
            endpoint,
        })
    }
}

/// A client token for a create made under idempotency key `key`: the same
/// for every try of the step (AWS then returns what the first try made),
/// different for every step and run. At most 64 ASCII characters, as EC2
/// and EBS require.
pub fn client_token(key: &str, what: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, format!("{what}\0{key}").as_bytes());
    format!("ferry-{}", hex::encode(&d.as_ref()[..16]))
}

/// The run id of an idempotency key `RUN/NODE`.
pub fn run_of(key: &str) -> &str {
    key.split('/').next().unwrap_or(key)
}

fn sha256_hex(text: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref())
}

/// The start of every [`short_name`] of run `run`: `ferry-RRRRRRRR-`, so a
/// teardown finds a crashed run's load balancers, databases and health
/// checks by name before it confirms each by its tags.
pub fn run_prefix(run: &str) -> String {
    format!("ferry-{}-", &sha256_hex(run)[..8])
}

/// A name for what step `key` made where a service names resources with a
/// short, strict alphabet (ELBv2: 32 characters, RDS: 63, letters, digits
/// and hyphens, starting with a letter): `ferry-RRRRRRRR-KKKKKKKKKKKK`, 27
/// characters, the run's hash then the key's. The same for every try of
/// the step, so a retry finds what the first try made.
pub fn short_name(key: &str) -> String {
    format!("{}{}", run_prefix(run_of(key)), &sha256_hex(key)[..12])
}

/// A name AWS shows in its consoles for what step `key` made.
pub fn display_name(key: &str) -> String {
    format!("ferry-{}", key.replace('/', "-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stable_short_and_distinct() {
        let a = client_token("run-1/db", "instance");
        assert_eq!(a, client_token("run-1/db", "instance"));
        assert_ne!(a, client_token("run-1/web", "instance"));
        assert_ne!(a, client_token("run-1/db", "snapshot"));
        assert!(a.len() <= 64 && a.is_ascii());
        assert_eq!(run_of("run-1/db[2]"), "run-1");
    }

    #[test]
    fn short_names_fit_every_service_and_start_with_their_run() {
        let a = short_name("run-1/lb");
        assert_eq!(a.len(), 27);
        assert!(a.starts_with(&run_prefix("run-1")));
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        );
        assert_ne!(a, short_name("run-1/lb2"));
        assert_ne!(run_prefix("run-1"), run_prefix("run-2"));
    }
}
