//! Checks: each tries until it passes or its deadline passes
//! (wait-until-ready), then reports how many tries it took. Checks verify
//! the rebuilt stack from outside, whatever target built it: they depend on
//! no target.

use crate::step::{ActionError, Call, CancelOnDrop, Ctx, Outputs, clip, command, disk_index};
use anyhow::Context as _;
use serde_json::{Value, json};
use sqlx::Connection;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The checks of the catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    Tcp,
    Http,
    Command,
    Sql,
    Disk,
}

impl Check {
    pub fn from_name(name: &str) -> Option<Check> {
        Some(match name {
            "check.tcp" => Check::Tcp,
            "check.http" => Check::Http,
            "check.command" => Check::Command,
            "check.sql" => Check::Sql,
            "check.disk" => Check::Disk,
            _ => return None,
        })
    }
}

/// Tries the check every `interval` until it passes or `deadline` passes.
pub async fn run(check: Check, ctx: Arc<Ctx>, call: Call) -> Result<Outputs, ActionError> {
    let deadline = call.duration("deadline", Duration::from_secs(120))?;
    let interval = call.duration("interval", Duration::from_secs(1))?;
    let start = Instant::now();
    let mut tries = 0u64;
    loop {
        tries += 1;
        let result = match check {
            Check::Tcp => tcp(&call).await,
            Check::Http => http(&call).await,
            Check::Command => cmd(&ctx, &call).await,
            Check::Sql => sql(&ctx, &call).await,
            Check::Disk => {
                // Deterministic: trying again cannot change the answer.
                let (c, k) = (ctx.clone(), call.clone());
                let progress = Arc::new(ferry_agent::progress::Progress::default());
                let _stop = CancelOnDrop(progress.clone());
                return tokio::task::spawn_blocking(move || disk(&c, &k, &progress))
                    .await
                    .map_err(|e| ActionError::transient(format!("check task: {e}")))?;
            }
        };
        match result {
            Ok(mut out) => {
                out.insert("tries".into(), json!(tries));
                out.insert("ready_secs".into(), json!(start.elapsed().as_secs_f64()));
                return Ok(out);
            }
            Err(Fail::Now(e)) => return Err(e),
            Err(Fail::Retry(msg)) => {
                if start.elapsed() + interval > deadline {
                    return Err(ActionError::permanent(format!(
                        "did not pass within {:.0}s ({tries} tries); last: {msg}",
                        deadline.as_secs_f64()
                    )));
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

enum Fail {
    /// Not ready yet: try again until the deadline.
    Retry(String),
    /// Trying again cannot help (bad input).
    Now(ActionError),
}

impl From<ActionError> for Fail {
    fn from(e: ActionError) -> Fail {
        Fail::Now(e)
    }
}

async fn tcp(call: &Call) -> Result<Outputs, Fail> {
    let addr = call.need("address")?;
    match tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    {
        Ok(Ok(_)) => Ok(Outputs::new()),
        Ok(Err(e)) => Err(Fail::Retry(format!("connect {addr}: {e}"))),
        Err(_) => Err(Fail::Retry(format!("connect {addr}: no answer in 3 s"))),
    }
}

fn text_matches(call: &Call, text: &str, what: &str) -> Result<(), Fail> {
    if let Some(want) = call.str("contains")
        && !text.contains(&want)
    {
        let shown: String = text.chars().take(200).collect();
        return Err(Fail::Retry(format!(
            "{what} does not contain `{want}` (it starts: {shown:?})"
        )));
    }
    if let Some(re) = call.str("matches") {
        let re = regex::Regex::new(&re)
            .map_err(|e| Fail::Now(ActionError::permanent(format!("`matches`: {e}"))))?;
        if !re.is_match(text) {
            return Err(Fail::Retry(format!("{what} does not match /{re}/")));
        }
    }
    Ok(())
}

async fn http(call: &Call) -> Result<Outputs, Fail> {
    let url = call.need("url")?;
    let want = call.int("status", 200)?;
    let shown = crate::redact::redact(&url);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::limited(5))
        .build()
        .map_err(|e| Fail::Now(ActionError::permanent(format!("http client: {e}"))))?;
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| Fail::Retry(format!("GET {shown}: {}", error_text(&e))))?;
    let status = i64::from(resp.status().as_u16());
    let body = resp
        .bytes()
        .await
        .map_err(|e| Fail::Retry(format!("GET {shown}: reading the body: {e}")))?;
    if status != want {
        return Err(Fail::Retry(format!(
            "GET {shown}: status {status}, wanted {want}"
        )));
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(1 << 20)]);
    text_matches(call, &text, "the body")?;
    let mut o = Outputs::new();
    o.insert("status".into(), json!(status));
    Ok(o)
}

fn error_text(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

async fn cmd(ctx: &Ctx, call: &Call) -> Result<Outputs, Fail> {
    let want = call.int("exit", 0)?;
    let out = command(ctx, call)?.output().await.map_err(|e| {
        Fail::Now(ActionError::permanent(format!(
            "cannot start the command: {e}"
        )))
    })?;
    let code = out.status.code().map_or(-1, i64::from);
    let stdout = clip(&out.stdout);
    if code != want {
        return Err(Fail::Retry(format!(
            "exited with {code} (wanted {want}): {}",
            clip(&out.stderr)
        )));
    }
    text_matches(call, &stdout, "the output")?;
    let mut o = Outputs::new();
    o.insert("stdout".into(), Value::String(stdout));
    Ok(o)
}

/// The first column of the first row, as text.
async fn sql(ctx: &Ctx, call: &Call) -> Result<Outputs, Fail> {
    let url = call.need("url")?;
    let query = call.need("query")?;
    // Only a secret the runbook declares: never the orchestrator's own.
    let password = match call.str("password_env").filter(|v| !v.is_empty()) {
        Some(var) => Some(ctx.secret(&var)?.to_owned()),
        None => None,
    };
    let shown = crate::redact::redact(&url);
    let value: Option<String> =
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let mut opts: sqlx::postgres::PgConnectOptions = url
                .parse()
                .map_err(|e| Fail::Now(ActionError::permanent(format!("`url` {shown}: {e}"))))?;
            if let Some(p) = &password {
                opts = opts.password(p);
            }
            let mut conn = sqlx::PgConnection::connect_with(&opts)
                .await
                .map_err(|e| Fail::Retry(format!("connect {shown}: {e}")))?;
            let row = sqlx::query(sqlx::AssertSqlSafe(query.clone()))
                .fetch_optional(&mut conn)
                .await
                .map_err(|e| Fail::Retry(format!("query on {shown}: {e}")))?;
            let _ = conn.close().await;
            row.map(|r| pg_text(&r))
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            let url = url.replacen("mariadb://", "mysql://", 1);
            let mut opts: sqlx::mysql::MySqlConnectOptions = url
                .parse()
                .map_err(|e| Fail::Now(ActionError::permanent(format!("`url` {shown}: {e}"))))?;
            if let Some(p) = &password {
                opts = opts.password(p);
            }
            let mut conn = sqlx::MySqlConnection::connect_with(&opts)
                .await
                .map_err(|e| Fail::Retry(format!("connect {shown}: {e}")))?;
            let row = sqlx::query(sqlx::AssertSqlSafe(query.clone()))
                .fetch_optional(&mut conn)
                .await
                .map_err(|e| Fail::Retry(format!("query on {shown}: {e}")))?;
            let _ = conn.close().await;
            row.map(|r| mysql_text(&r))
        } else {
            return Err(Fail::Now(ActionError::permanent(format!(
                "`url` {shown}: use postgres:// or mysql://"
            ))));
        };
    let Some(value) = value else {
        return Err(Fail::Retry(format!("`{query}` returned no rows")));
    };
    if let Some(want) = call.str("expect")
        && value != want
    {
        return Err(Fail::Retry(format!(
            "`{query}` returned `{value}`, expected `{want}`"
        )));
    }
    let mut o = Outputs::new();
    o.insert("value".into(), Value::String(value));
    Ok(o)
}

fn pg_text(r: &sqlx::postgres::PgRow) -> String {
    use sqlx::Row;
    if let Ok(Some(v)) = r.try_get::<Option<String>, _>(0) {
        return v;
    }
    if let Ok(Some(v)) = r.try_get::<Option<i64>, _>(0) {
        return v.to_string();
    }
    if let Ok(Some(v)) = r.try_get::<Option<i32>, _>(0) {
        return v.to_string();
    }
    if let Ok(Some(v)) = r.try_get::<Option<i16>, _>(0) {
        return v.to_string();
    }
    if let Ok(Some(v)) = r.try_get::<Option<f64>, _>(0) {
        return v.to_string();
    }
    if let Ok(Some(v)) = r.try_get::<Option<bool>, _>(0) {
        return v.to_string();
    }
    "NULL".into()
}

fn mysql_text(r: &sqlx::mysql::MySqlRow) -> String {
    use sqlx::Row;
    if let Ok(Some(v)) = r.try_get::<Option<String>, _>(0) {
        return v;
    }
    if let Ok(Some(v)) = r.try_get::<Option<i64>, _>(0) {
        return v.to_string();
    }
    if let Ok(Some(v)) = r.try_get::<Option<u64>, _>(0) {
        return v.to_string();
    }
    if let Ok(Some(v)) = r.try_get::<Option<f64>, _>(0) {
        return v.to_string();
    }
    if let Ok(Some(v)) = r.try_get::<Option<Vec<u8>>, _>(0) {
        return String::from_utf8_lossy(&v).into_owned();
    }
    "NULL".into()
}

/// `check.disk`: reads the point's disk back from the repository (every chunk
/// verified against its id) and compares its BLAKE3 with the image file's;
/// then, if the image holds ext2/3/4, `e2fsck -fn` must find it clean.
fn disk(
    ctx: &Ctx,
    call: &Call,
    progress: &ferry_agent::progress::Progress,
) -> Result<Outputs, ActionError> {
    let path = std::path::PathBuf::from(call.need("path")?);
    if path.extension().is_some_and(|e| e == "qcow2") {
        return Err(ActionError::permanent(format!(
            "{}: check.disk reads raw images only; restore with `format: raw` (the default) for the check",
            path.display()
        )));
    }
    let repo = ctx.open_repo(call)?;
    let point = repo
        .resolve(&call.need("point")?)
        .map_err(|e| ActionError::from(anyhow::Error::from(e)))?;
    let disk = disk_index(&point, call.str("disk").as_deref())?;
    let (file_digest, file_size) =
        file_digest(&path).map_err(|e| ActionError::permanent(crate::error::anyhow_chain(&e)))?;
    let reader = ferry_agent::instant::DiskReader::open(repo, &point, disk, 64 << 20)
        .map_err(|e| ActionError::from(anyhow::Error::from(e)))?;
    if reader.size() != file_size {
        return Err(ActionError::permanent(format!(
            "{} is {file_size} bytes; the point's disk is {}",
            path.display(),
            reader.size()
        )));
    }
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0u64;
    while off < reader.size() {
        if progress.cancelled() {
            return Err(ferry_agent::Error::Cancelled {
                operation: "the disk check".into(),
                kept: "it changed nothing".into(),
            }
            .into());
        }
        let n = (reader.size() - off).min(buf.len() as u64) as usize;
        reader
            .read_at(&mut buf[..n], off)
            .map_err(|e| ActionError::from(anyhow::Error::from(e)))?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    let point_digest = h.finalize().to_hex().to_string();
    if point_digest != file_digest {
        return Err(ActionError::permanent(format!(
            "{} differs from point {} disk {} (BLAKE3 {} vs {}): the volume was changed after the restore",
            path.display(),
            point.short_id(),
            point.meta.disks[disk].name,
            &file_digest[..16],
            &point_digest[..16]
        )));
    }
    let fs = ext_magic(&path);
    let want_fsck = call.bool("fsck");
    if want_fsck == Some(true) && fs.is_none() {
        return Err(ActionError::permanent(format!(
            "{}: no ext2/3/4 file system to check",
            path.display()
        )));
    }
    if fs.is_some() && want_fsck != Some(false) {
        let out = std::process::Command::new("e2fsck")
            .args(["-f", "-n"])
            .arg(&path)
            .output()
            .map_err(|e| {
                ActionError::permanent(format!("cannot run e2fsck: {e} (install e2fsprogs)"))
            })?;
        if !out.status.success() {
            return Err(ActionError::permanent(format!(
                "e2fsck -fn {} found problems (exit {}): {}",
                path.display(),
                out.status.code().unwrap_or(-1),
                clip(&out.stdout)
            )));
        }
    }
    let mut o = Outputs::new();
    o.insert("digest".into(), json!(file_digest));
    o.insert("fs".into(), json!(fs.unwrap_or("none")));
    Ok(o)
}

/// `Some("ext4")` if the image starts with an ext2/3/4 superblock.
fn ext_magic(path: &std::path::Path) -> Option<&'static str> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).ok()?;
    let mut sb = [0u8; 1024];
    f.read_exact_at(&mut sb, 1024).ok()?;
    (sb[56] == 0x53 && sb[57] == 0xEF).then_some("ext4")
}

/// BLAKE3 of a file, and its size.
fn file_digest(path: &Path) -> anyhow::Result<(String, u64)> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    let n =
        std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    Ok((h.finalize().to_hex().to_string(), n))
}
