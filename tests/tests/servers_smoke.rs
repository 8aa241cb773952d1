//! The test servers themselves: moto with an Object Lock bucket and Azurite
//! with a container start, answer, and stop (scripts/setup-servers installs them).

#![allow(clippy::unwrap_used)]

mod common;

use common::servers::{Azurite, Moto};

#[test]
fn moto_and_azurite_start_and_answer() {
    let Some(moto) = Moto::start() else { return };
    moto.create_bucket("locked-bucket", true);
    let out = moto.python(
        r#"
        import datetime
        until = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
        s3.put_object(Bucket="locked-bucket", Key="k", Body=b"hello",
                      ObjectLockMode="COMPLIANCE", ObjectLockRetainUntilDate=until)
        h = s3.head_object(Bucket="locked-bucket", Key="k")
        v = s3.get_bucket_versioning(Bucket="locked-bucket")
        print(json.dumps({"len": h["ContentLength"], "mode": h.get("ObjectLockMode"),
                          "versioning": v.get("Status"), "version": h.get("VersionId")}))
        "#,
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["len"], 5, "{out}");
    assert_eq!(v["mode"], "COMPLIANCE", "{out}");
    assert_eq!(v["versioning"], "Enabled", "{out}");
    // Deleting the locked version is refused.
    let refused = moto.python_args(
        r#"
        try:
            s3.delete_object(Bucket="locked-bucket", Key="k", VersionId=sys.argv[1])
            print("deleted")
        except s3.exceptions.ClientError as e:
            print("refused", e.response["Error"]["Code"])
        "#,
        &[v["version"].as_str().unwrap()],
    );
    assert!(refused.starts_with("refused"), "{refused}");
    assert_eq!(moto.env().len(), 5);

    let Some(azurite) = Azurite::start() else {
        return;
    };
    azurite.create_container("backups");
    let names = azurite.python("print(','.join(c.name for c in service.list_containers()))");
    assert_eq!(names.trim(), "backups");
    assert!(
        azurite
            .env()
            .contains(&("AZURITE_BLOB_STORAGE_URL".into(), azurite.endpoint.clone()))
    );

    // Dropping stops both by PID.
    let pids = [moto.pid(), azurite.pid()];
    drop(moto);
    drop(azurite);
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "server {pid} still running"
        );
    }
}
