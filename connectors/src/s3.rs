//! S3 and S3-compatible stores.
//!
//! The data path (get, ranged get, put, list, delete) goes through `object_store`,
//! which is fast and streams. What `object_store` does not speak goes through the
//! AWS SDK: Object Lock (puts and multipart uploads with a retention date,
//! extending it, reading it),
//! object versions, and the bucket's lock configuration.
//!
//! Credentials, region and endpoint come from the AWS SDK's default chain
//! (environment, `~/.aws/config` and `credentials` profiles, SSO, web identity,
//! container and instance roles), so a repository URL holds no secret. The same
//! chain signs `object_store`'s requests through [`SdkCredentials`].

use std::sync::Arc;

use aws_credential_types::provider::ProvideCredentials;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, DateTime as AwsTime};
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ObjectLockEnabled, ObjectLockMode,
    ObjectLockRetention, ObjectLockRetentionMode, StorageClass,
};
use bytes::Bytes;
use chrono::{DateTime, SubsecRound, Utc};
use ferry_agent::store::{
    Leftover, Leftovers, LockMode, NoAnswer, ObjectVersion, PartedUpload, Retention, ServerAnswer,
    Versioned, is_repository_name,
};
use ferry_agent::{Error, Result};
use futures::FutureExt;
use futures::future::BoxFuture;
use object_store::aws::{AmazonS3Builder, AwsCredential, S3ConditionalPut};
use object_store::multipart::PartId;
use object_store::{CredentialProvider, PutPayload};

/// Where an `s3://` URL points, and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
}

impl S3Url {
    /// `s3://BUCKET[/PREFIX][?endpoint=URL&region=NAME]`.
    pub fn parse(url: &str) -> Result<S3Url> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| Error::InvalidInput(format!("{url} is not an s3:// URL")))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.len() < 3
            || bucket.len() > 63
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            return Err(Error::InvalidInput(format!(
                "{url}: {bucket:?} is not a valid bucket name (3 to 63 lowercase letters, digits, '-' or '.')"
            )));
        }
        let mut out = S3Url {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint: None,
            region: None,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("endpoint", v)) => out.endpoint = Some(v.to_string()),
                Some(("region", v)) => out.region = Some(v.to_string()),
                _ => {
                    return Err(Error::InvalidInput(format!(
                        "{url}: unknown option {pair:?}; s3:// URLs take endpoint= and region="
                    )));
                }
            }
        }
        Ok(out)
    }
}

/// Signs `object_store` requests with whatever the AWS SDK's chain provides.
#[derive(Debug)]
struct SdkCredentials(aws_credential_types::provider::SharedCredentialsProvider);

#[async_trait::async_trait]
impl CredentialProvider for SdkCredentials {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        let c = self
            .0
            .provide_credentials()
            .await
            .map_err(|e| object_store::Error::Unauthenticated {
                path: String::new(),
                source: format!("no AWS credentials: {e}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run where an instance role is available").into(),
            })?;
        Ok(Arc::new(AwsCredential {
            key_id: c.access_key_id().to_string(),
            secret_key: c.secret_access_key().to_string(),
            token: c.session_token().map(str::to_string),
        }))
    }
}

/// Open an `s3://` repository location: the data-path store, its multipart
/// API (the same store), and the SDK side.
pub(crate) fn open(location: &str) -> Result<crate::opened::Opened> {
    let url = S3Url::parse(location)?;
    // The runtime that will drive every request is the store's; build the SDK
    // configuration on a throwaway one (it only reads files and the environment).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::InvalidInput(format!("cannot start a runtime: {e}")))?;
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        // Ferry retries every request itself, with its own bounds.
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1));
    if let Some(region) = &url.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(endpoint) = &url.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    let sdk = rt.block_on(loader.load());
    let region = sdk
        .region()
        .map(|r| r.to_string())
        .unwrap_or_else(|| "us-east-1".to_string());
    let endpoint = sdk.endpoint_url().map(str::to_string);
    let credentials = sdk.credentials_provider().ok_or_else(|| {
        Error::InvalidInput(
            "no AWS credentials provider: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE".into(),
        )
    })?;

    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(&url.bucket)
        .with_region(&region)
        .with_credentials(Arc::new(SdkCredentials(credentials)))
        // Each upload carries a CRC64-NVME checksum that the server verifies
        // before it stores the bytes, and its payload goes unsigned. Signing
        // the payload would hash every byte with SHA-256 on both ends and buy
        // nothing: what a request stores is checked by that checksum against
        // accidents, against tampering by TLS and by the repository's
        // authenticated encryption of every object (an attacker on a plain
        // HTTP path could forge the answer to a signed request anyway).
        // docs/performance.md, Object storage, has the cost.
        .with_checksum_algorithm(object_store::aws::Checksum::CRC64NVME)
        .with_unsigned_payload(true)
        .with_conditional_put(S3ConditionalPut::ETagMatch)
        .with_retry(crate::http::no_retries())
        .with_http_connector(crate::http::TypedConnector { store: "S3" });
    if let Some(endpoint) = &endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"))
            // S3-compatible servers (MinIO, Ceph, moto) want path-style requests.
            .with_virtual_hosted_style_request(false);
    }
    let s3 = builder
        .build()
        .map_err(|e| Error::InvalidInput(format!("cannot use {location}: {e}")))?;
    let (inner, parts) = crate::opened::with_parts(s3, &url.prefix);

    let conf = aws_sdk_s3::config::Builder::from(&sdk)
        .force_path_style(endpoint.is_some())
        .build();
    let sdk = Arc::new(S3Sdk {
        client: aws_sdk_s3::Client::from_conf(conf),
        bucket: url.bucket.clone(),
        prefix: if url.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", url.prefix)
        },
    });
    Ok(crate::opened::Opened {
        inner,
        parts: Some(parts),
        versioned: Some(sdk.clone()),
        leftovers: Some(sdk),
    })
}

/// The retention of `key` (its current version, or `version`), if it has one.
async fn read_retention(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: String,
    version: Option<&str>,
) -> Result<Option<Retention>, object_store::Error> {
    let head = client
        .head_object()
        .bucket(bucket)
        .key(&key)
        .set_version_id(version.map(str::to_string))
        .send()
        .await
        .map_err(|e| sdk_error(&key, e))?;
    let mode = match head.object_lock_mode() {
        Some(ObjectLockMode::Compliance) => LockMode::Compliance,
        Some(ObjectLockMode::Governance) => LockMode::Governance,
        _ => return Ok(None),
    };
    Ok(head.object_lock_retain_until_date().map(|t| Retention {
        mode,
        until: from_aws(t),
    }))
}

/// Set `retention` on `key` (its current version, or `version`).
async fn set_retention(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: String,
    version: Option<&str>,
    retention: Retention,
) -> Result<(), object_store::Error> {
    let mode = match retention.mode {
        LockMode::Compliance => ObjectLockRetentionMode::Compliance,
        LockMode::Governance => ObjectLockRetentionMode::Governance,
    };
    client
        .put_object_retention()
        .bucket(bucket)
        .key(&key)
        .set_version_id(version.map(str::to_string))
        .retention(
            ObjectLockRetention::builder()
                .mode(mode)
                .retain_until_date(to_aws(retention.until))
                .build(),
        )
        .send()
        .await
        .map_err(|e| sdk_error(&key, e))?;
    Ok(())
}

/// A multipart upload started with a retention, through the AWS SDK
/// (`object_store` cannot set Object Lock headers). The object appears,
/// locked, only when the upload completes.
#[derive(Debug)]
struct RetainedUpload {
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    upload_id: String,
    retention: Retention,
    /// Parts sent, by number (S3 numbers them from 1), with what completing
    /// the upload must name; a part sent again replaces its entry.
    done: std::sync::Mutex<std::collections::BTreeMap<i32, CompletedPart>>,
}

impl PartedUpload for RetainedUpload {
    fn put_part(
        &self,
        index: usize,
        data: PutPayload,
    ) -> BoxFuture<'_, object_store::Result<PartId>> {
        async move {
            let number = i32::try_from(index + 1).map_err(|_| object_store::Error::Generic {
                store: "S3",
                source: format!("{}: part {index} is past S3's numbering", self.key).into(),
            })?;
            let sent = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(&self.upload_id)
                .part_number(number)
                .checksum_algorithm(ChecksumAlgorithm::Sha256)
                .body(ByteStream::from(Bytes::from(data)))
                .send()
                .await
                .map_err(|e| sdk_error(&self.key, e))?;
            let e_tag = sent.e_tag().unwrap_or_default().to_string();
            let part = CompletedPart::builder()
                .part_number(number)
                .e_tag(&e_tag)
                .set_checksum_sha256(sent.checksum_sha256().map(str::to_string))
                .build();
            self.done.lock().expect("parts sent").insert(number, part);
            Ok(PartId { content_id: e_tag })
        }
        .boxed()
    }

    fn complete(&self, parts: Vec<PartId>) -> BoxFuture<'_, object_store::Result<()>> {
        async move {
            let sent: Vec<CompletedPart> = self
                .done
                .lock()
                .expect("parts sent")
                .values()
                .cloned()
                .collect();
            if sent.len() != parts.len() {
                return Err(object_store::Error::Generic {
                    store: "S3",
                    source: format!(
                        "{}: completing an upload of {} parts with {} sent",
                        self.key,
                        parts.len(),
                        sent.len()
                    )
                    .into(),
                });
            }
            let done = self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(&self.upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(sent))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| sdk_error(&self.key, e))?;
            // S3 locks the object as it completes. Some S3-compatible servers
            // (moto among them) ignore the lock headers of a multipart upload:
            // the object must not stay unlocked there, so its retention is read
            // back and set when it is missing or shorter.
            let version = done.version_id();
            let (client, bucket) = (&self.client, self.bucket.as_str());
            let kept = read_retention(client, bucket, self.key.clone(), version).await?;
            // Dates are kept to the second.
            let want = self.retention.until.trunc_subsecs(0);
            if kept.is_none_or(|k| k.mode != self.retention.mode || k.until < want) {
                set_retention(client, bucket, self.key.clone(), version, self.retention).await?;
            }
            Ok(())
        }
        .boxed()
    }

    fn abort(&self) -> BoxFuture<'_, object_store::Result<()>> {
        async move {
            self.client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(&self.upload_id)
                .send()
                .await
                .map_err(|e| sdk_error(&self.key, e))?;
            Ok(())
        }
        .boxed()
    }
}

/// What `object_store` does not speak, through the AWS SDK: versions, Object
/// Lock, and the uploads in parts never completed.
#[derive(Debug)]
struct S3Sdk {
    client: aws_sdk_s3::Client,
    bucket: String,
    /// The repository's prefix in the bucket, with a trailing `/` (or empty).
    prefix: String,
}

/// Turn an SDK error into the `object_store` error of the same meaning, with the
/// status as a typed cause, so the store's one retry decision
/// (`ferry_agent::store::retry_of`) applies to both clients alike.
fn sdk_error<E>(key: &str, e: SdkError<E, HttpResponse>) -> object_store::Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = e.raw_response().map(|r| r.status().as_u16());
    let code = e.code().unwrap_or("").to_string();
    let message = format!(
        "{}{}",
        if code.is_empty() {
            String::new()
        } else {
            format!("{code}: ")
        },
        e.message().map(str::to_string).unwrap_or_else(|| {
            let mut s = e.to_string();
            let mut cur = std::error::Error::source(&e);
            while let Some(c) = cur {
                s.push_str(&format!(": {c}"));
                cur = c.source();
            }
            s
        })
    );
    let source: Box<dyn std::error::Error + Send + Sync> = message.into();
    match status {
        Some(404) => object_store::Error::NotFound {
            path: key.to_string(),
            source,
        },
        Some(401 | 403) => object_store::Error::PermissionDenied {
            path: key.to_string(),
            source,
        },
        // A server that does not implement the call (501) never will.
        Some(501) => object_store::Error::NotImplemented {
            operation: format!("{key}: {source}"),
            implementer: "this S3 server".into(),
        },
        // Any other answer: its status decides in `ferry_agent::store::retry_of`
        // (throttling and server errors are retried, other refusals are not).
        Some(status) => object_store::Error::Generic {
            store: "S3",
            source: Box::new(ServerAnswer {
                store: "S3",
                status,
                code,
            }),
        },
        // No answer at all: timeouts, resets, DNS.
        None => object_store::Error::Generic {
            store: "S3",
            source: Box::new(NoAnswer {
                store: "S3",
                source,
            }),
        },
    }
}

/// Ferry's object names are `[a-z0-9/]` plus the user's prefix; escape the rest
/// for the `x-amz-copy-source` header.
fn urlencoding_path(key: &str) -> String {
    key.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn to_aws(t: DateTime<Utc>) -> AwsTime {
    AwsTime::from_secs(t.timestamp())
}

fn from_aws(t: &AwsTime) -> DateTime<Utc> {
    DateTime::from_timestamp(t.secs(), 0).unwrap_or_default()
}

fn mode(m: LockMode) -> ObjectLockMode {
    match m {
        LockMode::Governance => ObjectLockMode::Governance,
        LockMode::Compliance => ObjectLockMode::Compliance,
    }
}

impl S3Sdk {
    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

impl Versioned for S3Sdk {
    fn lock_enabled(&self) -> BoxFuture<'_, Result<bool, object_store::Error>> {
        async move {
            match self
                .client
                .get_object_lock_configuration()
                .bucket(&self.bucket)
                .send()
                .await
            {
                Ok(out) => Ok(out
                    .object_lock_configuration()
                    .and_then(|c| c.object_lock_enabled())
                    == Some(&ObjectLockEnabled::Enabled)),
                Err(e) if e.code() == Some("ObjectLockConfigurationNotFoundError") => Ok(false),
                Err(e) => Err(sdk_error(&self.bucket, e)),
            }
        }
        .boxed()
    }

    fn put_retained<'a>(
        &'a self,
        name: &'a str,
        data: Bytes,
        retention: Retention,
        storage_class: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), object_store::Error>> {
        async move {
            let key = self.key(name);
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                .body(ByteStream::from(data))
                .checksum_algorithm(ChecksumAlgorithm::Sha256)
                .object_lock_mode(mode(retention.mode))
                .object_lock_retain_until_date(to_aws(retention.until))
                .set_storage_class(storage_class.map(StorageClass::from))
                .send()
                .await
                .map_err(|e| sdk_error(&key, e))?;
            Ok(())
        }
        .boxed()
    }

    fn put_retained_parts<'a>(
        &'a self,
        name: &'a str,
        retention: Retention,
        storage_class: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Arc<dyn PartedUpload>, object_store::Error>> {
        async move {
            let key = self.key(name);
            // Parts of an upload with Object Lock must carry a checksum: the
            // algorithm named here is the one each part and the completion give.
            let created = self
                .client
                .create_multipart_upload()
                .bucket(&self.bucket)
                .key(&key)
                .checksum_algorithm(ChecksumAlgorithm::Sha256)
                .object_lock_mode(mode(retention.mode))
                .object_lock_retain_until_date(to_aws(retention.until))
                .set_storage_class(storage_class.map(StorageClass::from))
                .send()
                .await
                .map_err(|e| sdk_error(&key, e))?;
            let upload_id = created
                .upload_id()
                .ok_or_else(|| object_store::Error::Generic {
                    store: "S3",
                    source: format!("{key}: CreateMultipartUpload answered without an upload id")
                        .into(),
                })?;
            let upload: Arc<dyn PartedUpload> = Arc::new(RetainedUpload {
                client: self.client.clone(),
                bucket: self.bucket.clone(),
                key,
                upload_id: upload_id.to_string(),
                retention,
                done: Default::default(),
            });
            Ok(upload)
        }
        .boxed()
    }

    fn retention<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Retention>, object_store::Error>> {
        read_retention(&self.client, &self.bucket, self.key(name), None).boxed()
    }

    fn extend<'a>(
        &'a self,
        name: &'a str,
        retention: Retention,
    ) -> BoxFuture<'a, Result<(), object_store::Error>> {
        set_retention(&self.client, &self.bucket, self.key(name), None, retention).boxed()
    }

    fn versions<'a>(
        &'a self,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ObjectVersion>, object_store::Error>> {
        async move {
            let full = self.key(prefix);
            let mut out = Vec::new();
            let mut key_marker = None;
            let mut version_marker = None;
            loop {
                let page = self
                    .client
                    .list_object_versions()
                    .bucket(&self.bucket)
                    .prefix(&full)
                    .set_key_marker(key_marker.take())
                    .set_version_id_marker(version_marker.take())
                    .send()
                    .await
                    .map_err(|e| sdk_error(&full, e))?;
                let strip = |k: Option<&str>| {
                    k.and_then(|k| k.strip_prefix(self.prefix.as_str()))
                        .unwrap_or_default()
                        .to_string()
                };
                for v in page.versions() {
                    out.push(ObjectVersion {
                        name: strip(v.key()),
                        version: v.version_id().unwrap_or("null").to_string(),
                        delete_marker: false,
                        latest: v.is_latest().unwrap_or(false),
                        size: v.size().unwrap_or(0).max(0) as u64,
                        modified: v.last_modified().map(from_aws).unwrap_or_default(),
                    });
                }
                for m in page.delete_markers() {
                    out.push(ObjectVersion {
                        name: strip(m.key()),
                        version: m.version_id().unwrap_or("null").to_string(),
                        delete_marker: true,
                        latest: m.is_latest().unwrap_or(false),
                        size: 0,
                        modified: m.last_modified().map(from_aws).unwrap_or_default(),
                    });
                }
                if page.is_truncated() != Some(true) {
                    break;
                }
                key_marker = page.next_key_marker().map(str::to_string);
                version_marker = page.next_version_id_marker().map(str::to_string);
                if key_marker.is_none() {
                    break;
                }
            }
            // S3 lists a key's versions and its delete markers apart, each newest
            // first; merge them newest first per name, the current one on top
            // (a stable sort keeps S3's order within a second).
            out.sort_by(|a, b| {
                a.name
                    .cmp(&b.name)
                    .then(b.latest.cmp(&a.latest))
                    .then(b.modified.cmp(&a.modified))
            });
            Ok(out)
        }
        .boxed()
    }

    fn delete_version<'a>(
        &'a self,
        name: &'a str,
        version: &'a str,
    ) -> BoxFuture<'a, Result<(), object_store::Error>> {
        async move {
            let key = self.key(name);
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(&key)
                .version_id(version)
                .send()
                .await
                .map_err(|e| sdk_error(&key, e))?;
            Ok(())
        }
        .boxed()
    }

    fn set_storage_class<'a>(
        &'a self,
        name: &'a str,
        class: &'a str,
        retention: Option<Retention>,
    ) -> BoxFuture<'a, Result<(), object_store::Error>> {
        async move {
            let key = self.key(name);
            let source = format!("{}/{}", self.bucket, urlencoding_path(&key));
            let mut req = self
                .client
                .copy_object()
                .bucket(&self.bucket)
                .key(&key)
                .copy_source(source)
                .storage_class(StorageClass::from(class))
                .metadata_directive(aws_sdk_s3::types::MetadataDirective::Copy);
            if let Some(r) = retention {
                req = req
                    .object_lock_mode(mode(r.mode))
                    .object_lock_retain_until_date(to_aws(r.until));
                // A write with Object Lock headers must carry an integrity
                // header; a copy has no body, so this is the MD5 of the empty
                // body (what S3 checks it against). moto refuses the copy
                // without it (MissingUploadObjectWithObjectLockHeaders).
                req.customize()
                    .mutate_request(|r| {
                        r.headers_mut()
                            .insert("content-md5", "1B2M2Y8AsgTpgAEy7ijRfw==");
                    })
                    .send()
                    .await
                    .map_err(|e| sdk_error(&key, e))?;
                return Ok(());
            }
            req.send().await.map_err(|e| sdk_error(&key, e))?;
            Ok(())
        }
        .boxed()
    }

    fn get_version<'a>(
        &'a self,
        name: &'a str,
        version: &'a str,
    ) -> BoxFuture<'a, Result<Bytes, object_store::Error>> {
        async move {
            let key = self.key(name);
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(&key)
                .version_id(version)
                .send()
                .await
                .map_err(|e| sdk_error(&key, e))?;
            let body = out
                .body
                .collect()
                .await
                // The body was cut off: worth another try, like any lost answer.
                .map_err(|e| object_store::Error::Generic {
                    store: "S3",
                    source: Box::new(NoAnswer {
                        store: "S3",
                        source: Box::new(e),
                    }),
                })?;
            Ok(body.into_bytes())
        }
        .boxed()
    }

    fn get_version_range<'a>(
        &'a self,
        name: &'a str,
        version: &'a str,
        range: std::ops::Range<u64>,
    ) -> BoxFuture<'a, Result<Bytes, object_store::Error>> {
        async move {
            let key = self.key(name);
            if range.start >= range.end {
                return Ok(Bytes::new());
            }
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(&key)
                .version_id(version)
                .range(format!("bytes={}-{}", range.start, range.end - 1))
                .send()
                .await
                .map_err(|e| sdk_error(&key, e))?;
            let body = out
                .body
                .collect()
                .await
                .map_err(|e| object_store::Error::Generic {
                    store: "S3",
                    source: Box::new(e),
                })?;
            Ok(body.into_bytes())
        }
        .boxed()
    }
}

impl S3Sdk {
    /// The bytes the parts of upload `id` of `key` hold so far, and when the
    /// last of them landed (as far as the server's answers can be read);
    /// `None` when the upload is gone (completed or aborted since it was
    /// listed).
    async fn uploaded(
        &self,
        key: &str,
        id: &str,
    ) -> Result<Option<(u64, Option<DateTime<Utc>>)>, object_store::Error> {
        let mut bytes = 0u64;
        let mut latest: Option<DateTime<Utc>> = None;
        let mut marker = None;
        loop {
            let page = match self
                .client
                .list_parts()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(id)
                .set_part_number_marker(marker.take())
                .send()
                .await
            {
                Ok(p) => p,
                Err(e) if e.code() == Some("NoSuchUpload") => return Ok(None),
                // A server that answers OK in a shape the SDK cannot read
                // (moto names the answer's root `ListPartsResponse`, AWS
                // `ListPartsResult`): the upload is still there, its size
                // unknown. Counting it as empty beats leaving it open.
                Err(e) if e.raw_response().is_some_and(|r| r.status().is_success()) => {
                    tracing::warn!(upload = key, error = %aws_sdk_s3::error::DisplayErrorContext(&e), "cannot read the parts of an unfinished upload; its bytes are counted as 0");
                    return Ok(Some((bytes, latest)));
                }
                Err(e) => return Err(sdk_error(key, e)),
            };
            for part in page.parts() {
                bytes += part.size().map_or(0, |s| u64::try_from(s).unwrap_or(0));
                if let Some(t) = part.last_modified().map(from_aws) {
                    latest = latest.max(Some(t));
                }
            }
            match page.next_part_number_marker() {
                Some(next) if page.is_truncated() == Some(true) => marker = Some(next.to_string()),
                _ => return Ok(Some((bytes, latest))),
            }
        }
    }
}

/// Uploads in parts that were started and never completed nor aborted: a
/// process killed mid-upload, or one whose abort was lost. S3 keeps (and
/// bills) their parts until they are aborted.
impl Leftovers for S3Sdk {
    fn leftovers(&self) -> BoxFuture<'_, Result<Vec<Leftover>, object_store::Error>> {
        async move {
            let mut out = Vec::new();
            let (mut key_marker, mut id_marker) = (None, None);
            loop {
                let page = self
                    .client
                    .list_multipart_uploads()
                    .bucket(&self.bucket)
                    .set_prefix((!self.prefix.is_empty()).then(|| self.prefix.clone()))
                    .set_key_marker(key_marker.take())
                    .set_upload_id_marker(id_marker.take())
                    .send()
                    .await
                    .map_err(|e| sdk_error(&self.bucket, e))?;
                for u in page.uploads() {
                    let (Some(key), Some(id)) = (u.key(), u.upload_id()) else {
                        continue;
                    };
                    // Another program's upload in the same bucket is not ours.
                    let Some(name) = key.strip_prefix(&self.prefix) else {
                        continue;
                    };
                    if !is_repository_name(name) {
                        continue;
                    }
                    let Some((size, last_part)) = self.uploaded(key, id).await? else {
                        continue;
                    };
                    // Its last sign of life: the latest part, else its start
                    // (none reads as just started: kept).
                    let started = u.initiated().map_or_else(Utc::now, from_aws);
                    out.push(Leftover {
                        name: name.to_string(),
                        upload: Some(id.to_string()),
                        size,
                        modified: last_part.map_or(started, |t| t.max(started)),
                    });
                }
                if page.is_truncated() != Some(true) {
                    break;
                }
                key_marker = page.next_key_marker().map(str::to_string);
                id_marker = page.next_upload_id_marker().map(str::to_string);
                if key_marker.is_none() && id_marker.is_none() {
                    break;
                }
            }
            out.sort_by(|a, b| a.name.cmp(&b.name).then(a.modified.cmp(&b.modified)));
            Ok(out)
        }
        .boxed()
    }

    fn remove_leftover<'a>(
        &'a self,
        leftover: &'a Leftover,
    ) -> BoxFuture<'a, Result<(), object_store::Error>> {
        async move {
            let key = self.key(&leftover.name);
            let Some(id) = &leftover.upload else {
                return Err(object_store::Error::Generic {
                    store: "S3",
                    source: format!("{key}: an unfinished upload without its upload id").into(),
                });
            };
            match self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&key)
                .upload_id(id)
                .send()
                .await
            {
                Ok(_) => Ok(()),
                // Aborted or completed meanwhile (another prune): done.
                Err(e) if e.code() == Some("NoSuchUpload") => Ok(()),
                Err(e) => Err(sdk_error(&key, e)),
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_prefix_and_options() {
        let u =
            S3Url::parse("s3://my-bucket/dr/web?endpoint=http://127.0.0.1:9000&region=eu-west-1")
                .unwrap();
        assert_eq!(u.bucket, "my-bucket");
        assert_eq!(u.prefix, "dr/web");
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(u.region.as_deref(), Some("eu-west-1"));
        assert_eq!(S3Url::parse("s3://abc").unwrap().prefix, "");
        for bad in [
            "s3://ab",
            "s3://Upper/x",
            "s3://ok-bucket?colour=red",
            "s3://a_b/x",
        ] {
            let e = S3Url::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad.split('?').next().unwrap_or(bad)), "{e}");
        }
    }
}
