//! `ferry key ...`: a repository's passwords, one key file each
//! (`ferry_agent::keys`). The password given (`FERRY_PASSWORD`,
//! `--password-file`, a prompt) opens the repository; a new one comes from
//! `--new-password-file`, `FERRY_NEW_PASSWORD` or a prompt asked twice.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};

use super::output::print_json;
use crate::context::{Context, new_password};

#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    pub command: KeyCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// List the key files: one per password, with when and where each was
    /// made and its Argon2id cost.
    List,
    /// Add a password: a new key file for the same repository key. No data is
    /// encrypted again.
    Add {
        /// Read the new password from this file (else FERRY_NEW_PASSWORD, else a prompt).
        #[arg(long, value_name = "FILE", env = "FERRY_NEW_PASSWORD_FILE")]
        new_password_file: Option<PathBuf>,
    },
    /// Change the password given: add a key file for the new one, then remove
    /// the old one's. Also rewrites a key file made with older Argon2id
    /// parameters with today's.
    Passwd {
        /// Read the new password from this file (else FERRY_NEW_PASSWORD, else a prompt).
        #[arg(long, value_name = "FILE", env = "FERRY_NEW_PASSWORD_FILE")]
        new_password_file: Option<PathBuf>,
    },
    /// Remove a key file by its id (from `ferry key list`): its password no
    /// longer opens the repository. The one the password given opened cannot
    /// be removed.
    Remove { id: String },
}

pub fn key(ctx: &Context, a: &KeyArgs) -> Result<ExitCode> {
    match &a.command {
        KeyCommand::List => list(ctx),
        KeyCommand::Add { new_password_file } => {
            let repo = ctx.open_repo(false)?;
            let pw = new_password(new_password_file.clone())?;
            let added = repo.add_key(pw.bytes())?;
            if ctx.json {
                print_json(&added)?;
            } else {
                println!(
                    "added key {}: the new password opens {}",
                    added.id,
                    repo.store().location()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        KeyCommand::Passwd { new_password_file } => {
            let mut repo = ctx.open_repo(false)?;
            let pw = new_password(new_password_file.clone())?;
            let change = repo.change_password(pw.bytes())?;
            if ctx.json {
                print_json(&change)?;
            } else {
                println!("added key {} for the new password", change.added.id);
                match (&change.removed, &change.kept) {
                    (Some(old), _) => {
                        println!(
                            "removed key {old}: the old password no longer opens the repository"
                        );
                    }
                    (None, Some(why)) => println!(
                        "kept the old key file, so the old password still opens the repository until it can be removed: {why}"
                    ),
                    (None, None) => {}
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        KeyCommand::Remove { id } => {
            let repo = ctx.open_repo(false)?;
            repo.remove_key(id)?;
            if ctx.json {
                print_json(&serde_json::json!({ "removed": id }))?;
            } else {
                println!("removed key {id}: its password no longer opens the repository");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn list(ctx: &Context) -> Result<ExitCode> {
    let repo = ctx.open_repo(false)?;
    let keys = repo.keys()?;
    if ctx.json {
        print_json(&keys)?;
        return Ok(ExitCode::SUCCESS);
    }
    let today = ferry_agent::crypto::KdfParams::default();
    let older = |k: &ferry_agent::keys::KeyInfo| {
        (k.memory_kib, k.iterations, k.parallelism)
            != (today.memory_kib, today.iterations, today.parallelism)
    };
    for k in &keys.keys {
        let older = older(k);
        println!(
            "{} {} {:<20} Argon2id {} MiB, {} passes, {} lane(s){}{}",
            if k.current { "*" } else { " " },
            k.id,
            k.created.format("%Y-%m-%d %H:%M UTC"),
            k.memory_kib / 1024,
            k.iterations,
            k.parallelism,
            if k.host.is_empty() {
                String::new()
            } else {
                format!(", made on {}", k.host)
            },
            if older { " (older parameters)" } else { "" },
        );
    }
    for u in &keys.unusable {
        println!("! {} cannot be used: {}", u.id, u.error);
    }
    println!("* the key file the password given opened");
    if keys.keys.iter().any(older) {
        println!(
            "key files with older Argon2id parameters open as before; `ferry key passwd`, given their password, rewrites them with today's"
        );
    }
    Ok(ExitCode::SUCCESS)
}
