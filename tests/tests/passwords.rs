//! Repository passwords from the user's side: weak ones refused at `init`,
//! the environment read as bytes like a password file, key files kept private.

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;

use common::{Env, stderr};

#[test]
fn a_blank_or_short_password_is_refused_at_init_and_nothing_is_created() {
    let env = Env::new();
    for weak in [" ", "   \t", "short"] {
        let o = env
            .cmd()
            .env("FERRY_PASSWORD", weak)
            .arg("init")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{weak:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("nothing was created"), "{}", stderr(&o));
        assert!(!env.repo.join("config").exists());
    }
}

#[test]
fn a_password_that_is_not_utf8_works_from_the_environment_as_from_a_file() {
    let env = Env::new();
    let password = b"caf\xe9 au lait \xff";
    let o = env
        .cmd()
        .env("FERRY_PASSWORD", OsStr::from_bytes(password))
        .arg("init")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let file = env.path("pw");
    std::fs::write(&file, [&password[..], b"\n"].concat()).unwrap();
    let o = env
        .cmd()
        .env_remove("FERRY_PASSWORD")
        .args(["points", "--password-file", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = env
        .cmd()
        .env("FERRY_PASSWORD", OsStr::from_bytes(password))
        .arg("points")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    // The key file and the config are readable by their owner only.
    for entry in std::fs::read_dir(env.repo.join("keys")).unwrap() {
        let mode = entry.unwrap().metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let mode = std::fs::metadata(env.repo.join("config"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// `ferry key`: a password added opens the repository, a changed one stops
/// opening it, a removed one too, and the data stays readable throughout. The
/// repository is the version-1 fixture, whose key file has the Argon2id
/// parameters of an earlier build: `key passwd` rewrites it with today's.
#[test]
fn passwords_are_added_changed_and_removed_and_old_key_files_rewritten() {
    let env = Env::new();
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/fixtures/repo-v1");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(&fixture)
        .arg(&env.repo)
        .status()
        .unwrap();
    assert!(st.success());
    let with = |password: &str, args: &[&str]| {
        env.cmd()
            .env("FERRY_PASSWORD", password)
            .env_remove("FERRY_NEW_PASSWORD")
            .args(args)
            .output()
            .unwrap()
    };
    let json = |o: std::process::Output| -> serde_json::Value {
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let old = "format-v1-fixture";
    let keys = json(with(old, &["--json", "key", "list"]));
    let listed = keys["keys"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{keys}");
    let first = listed[0]["id"].as_str().unwrap().to_string();
    assert_eq!(listed[0]["current"], true, "{keys}");
    assert_eq!(listed[0]["parallelism"], 1, "{keys}");
    let text = with(old, &["key", "list"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("(older parameters)"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );

    // A weak new password is refused and nothing is written.
    let o = with(old, &["key", "add"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("FERRY_NEW_PASSWORD"), "{}", stderr(&o));
    let o = env
        .cmd()
        .env("FERRY_PASSWORD", old)
        .env("FERRY_NEW_PASSWORD", "short")
        .args(["key", "add"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("nothing was created"), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(env.repo.join("keys")).unwrap().count(), 1);

    // Changing the password, from a file: the new key file has today's
    // parameters and is private; the old password no longer opens.
    let file = env.path("new-password");
    std::fs::write(&file, "a brand new password\n").unwrap();
    let change = json(with(
        old,
        &[
            "--json",
            "key",
            "passwd",
            "--new-password-file",
            file.to_str().unwrap(),
        ],
    ));
    assert_eq!(change["removed"], first.as_str(), "{change}");
    assert_eq!(change["added"]["parallelism"], 4, "{change}");
    assert_eq!(change["added"]["memory_kib"], 65536, "{change}");
    let new = "a brand new password";
    let o = with(old, &["points"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("wrong password"), "{}", stderr(&o));
    let keys = json(with(new, &["--json", "key", "list"]));
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1, "{keys}");
    assert_eq!(keys["keys"][0]["current"], true, "{keys}");
    for entry in std::fs::read_dir(env.repo.join("keys")).unwrap() {
        let mode = entry.unwrap().metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let check = json(with(new, &["--json", "check", "--read-data"]));
    assert_eq!(check["ok"], true, "{check}");
    assert_eq!(check["points"], 2, "{check}");

    // A second password; the key in use cannot be removed; the other can,
    // and then its password no longer opens.
    let added = json(
        env.cmd()
            .env("FERRY_PASSWORD", new)
            .env("FERRY_NEW_PASSWORD", "the password of the night shift")
            .args(["--json", "key", "add"])
            .output()
            .unwrap(),
    );
    let second = added["id"].as_str().unwrap();
    let points = json(with(
        "the password of the night shift",
        &["--json", "points"],
    ));
    assert_eq!(points.as_array().unwrap().len(), 2, "{points}");
    let current = change["added"]["id"].as_str().unwrap();
    let o = with(new, &["key", "remove", current]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("ferry key passwd"), "{}", stderr(&o));
    let o = with(new, &["key", "remove", "../config"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(env.repo.join("config").exists());
    let removed = json(with(new, &["--json", "key", "remove", second]));
    assert_eq!(removed["removed"], second, "{removed}");
    let o = with("the password of the night shift", &["points"]);
    assert!(stderr(&o).contains("wrong password"), "{}", stderr(&o));
    let restored = env.path("restored.img");
    let o = with(
        new,
        &[
            "restore",
            "fixture@latest",
            "--to",
            restored.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}
