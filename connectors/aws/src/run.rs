//! Everything one run made in an account, across the services: what the
//! drill's teardown, an undo after a crash, and the tests use, with no state
//! but the run id. The outermost module: it calls each service's own
//! listing and teardown, and none of them calls it.

use crate::{Aws, Result, ec2, elb, rds, route53};

/// Everything run `run` made that still exists, as `kind id` lines: load
/// balancers and target groups, DNS records and health checks, databases
/// and DB subnet groups, then EC2 resources.
pub async fn list_run(aws: &Aws, run: &str) -> Result<Vec<String>> {
    let mut out = elb::list_run(aws, run).await?;
    out.extend(route53::list_run(aws, run).await?);
    out.extend(rds::list_run(aws, run).await?);
    out.extend(ec2::list_run(aws, run).await?);
    Ok(out)
}

/// Removes everything run `run` made, in dependency order: DNS records
/// first (they point at the rest; each is put back as it was before the run
/// switched it), then load balancers and their target groups, databases and
/// their subnet groups, and the EC2 resources (networks last).
pub async fn teardown(aws: &Aws, run: &str) -> Result<()> {
    route53::teardown(aws, run).await?;
    elb::teardown(aws, run).await?;
    rds::teardown(aws, run).await?;
    ec2::teardown(aws, run).await
}
