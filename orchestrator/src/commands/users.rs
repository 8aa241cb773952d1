//! `ferry user ...` and `ferry token ...`: the console's and the API's users
//! and their tokens, in the orchestrator state. Whoever can open the state
//! (a private file, or the database's credentials) manages them; each change
//! goes to the audit log as `USER (cli)`.

use super::output::print_json;
use crate::auth::{self, Role};
use crate::context::Context;
use crate::error::Error;
use crate::exec::now_ms;
use crate::state::State;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct UserArgs {
    #[command(subcommand)]
    pub command: UserCommand,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user (the password from a prompt, or --password-file).
    Add {
        name: String,
        #[arg(long, value_enum)]
        role: Role,
        /// Read the password from this file (its first line).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// List users, their roles and tokens.
    List,
    /// Remove a user, their tokens and sessions.
    Remove { name: String },
    /// Set a user's password (ends their console sessions).
    Passwd {
        name: String,
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Change a user's role.
    Role {
        name: String,
        #[arg(value_enum)]
        role: Role,
    },
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make an API token that acts as the user, with the user's role. It is
    /// printed once; only its hash is kept.
    Create {
        #[arg(long)]
        user: String,
        /// How long it is valid: 30d, 12h, 90m (default: until revoked).
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
        /// What it is for, shown in listings.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// List tokens (never their secrets).
    List {
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke a token by its id (the part after `ferry_`, before the next `_`).
    Revoke { id: String },
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// The password for `name`: the first line of `file`, or typed twice at a
/// prompt.
fn new_password(name: &str, file: Option<&PathBuf>) -> Result<String> {
    let pw = match file {
        Some(f) => {
            let text = std::fs::read_to_string(f).map_err(|e| {
                Error::usage(format!(
                    "cannot read the password file {}: {e}",
                    f.display()
                ))
            })?;
            text.lines().next().unwrap_or_default().to_owned()
        }
        None => {
            let a = rpassword::prompt_password(format!("password for {name}: ")).map_err(|e| {
                Error::usage(format!(
                    "cannot read a password from the terminal ({e}); give --password-file"
                ))
            })?;
            let b = rpassword::prompt_password("again: ")
                .map_err(|e| Error::usage(format!("cannot read the password: {e}")))?;
            if a != b {
                return Err(Error::usage("the passwords differ").into());
            }
            a
        }
    };
    auth::check_password(&pw)?;
    Ok(pw)
}

pub fn user(ctx: &Context, a: &UserArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let state = State::open(&ctx.state_url).await?;
        let actor = auth::cli_actor();
        match &a.command {
            UserCommand::Add {
                name,
                role,
                password_file,
            } => {
                auth::check_user_name(name)?;
                if state.user(name).await?.is_some() {
                    return Err(Error::conflict(format!(
                        "user {name} exists; `ferry user passwd {name}` or `ferry user role {name} ROLE` change it"
                    ))
                    .into());
                }
                let pw = new_password(name, password_file.as_ref())?;
                let hash = auth::hash_password_blocking(pw).await?;
                if !state.add_user(name, role.as_str(), &hash, now_ms()).await? {
                    return Err(Error::conflict(format!("user {name} exists")).into());
                }
                auth::audit(&state, &actor, "user.add", name, role.as_str()).await;
                println!("added {name} ({role})");
            }
            UserCommand::List => {
                let users = state.users().await?;
                let tokens = state.tokens(None).await?;
                if ctx.json {
                    let out: Vec<_> = users
                        .iter()
                        .map(|u| {
                            serde_json::json!({
                                "name": u.name, "role": u.role, "created_ms": u.created_ms,
                                "tokens": tokens.iter().filter(|t| t.user == u.name).count(),
                            })
                        })
                        .collect();
                    print_json(&out)?;
                } else if users.is_empty() {
                    println!("no users; add one with `ferry user add NAME --role admin`");
                } else {
                    for u in &users {
                        let n = tokens.iter().filter(|t| t.user == u.name).count();
                        println!("{:<24} {:<9} {n} token(s)", u.name, u.role);
                    }
                }
            }
            UserCommand::Remove { name } => {
                if !state.remove_user(name).await? {
                    return Err(Error::not_found(format!("no user {name}")).into());
                }
                auth::audit(&state, &actor, "user.remove", name, "").await;
                println!("removed {name}, their tokens and sessions");
            }
            UserCommand::Passwd {
                name,
                password_file,
            } => {
                if state.user(name).await?.is_none() {
                    return Err(Error::not_found(format!("no user {name}")).into());
                }
                let pw = new_password(name, password_file.as_ref())?;
                let hash = auth::hash_password_blocking(pw).await?;
                state.set_password(name, &hash, now_ms()).await?;
                auth::audit(&state, &actor, "user.passwd", name, "").await;
                println!("password of {name} set; their console sessions ended");
            }
            UserCommand::Role { name, role } => {
                if !state.set_role(name, role.as_str(), now_ms()).await? {
                    return Err(Error::not_found(format!("no user {name}")).into());
                }
                auth::audit(&state, &actor, "user.role", name, role.as_str()).await;
                println!("{name} is now {role}");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn token(ctx: &Context, a: &TokenArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let state = State::open(&ctx.state_url).await?;
        let actor = auth::cli_actor();
        match &a.command {
            TokenCommand::Create {
                user,
                expires,
                label,
            } => {
                if state.user(user).await?.is_none() {
                    return Err(Error::not_found(format!(
                        "no user {user}; add one with `ferry user add {user} --role ROLE`"
                    ))
                    .into());
                }
                let now = now_ms();
                let expires_ms = expires
                    .as_deref()
                    .map(auth::parse_duration_ms)
                    .transpose()?
                    .map(|d| now + d);
                let (secret, row) = auth::new_token(user, label, now, expires_ms)?;
                state.add_token(&row).await?;
                auth::audit(&state, &actor, "token.create", user, &row.id).await;
                if ctx.json {
                    print_json(&serde_json::json!({
                        "id": row.id, "user": user, "token": secret, "expires_ms": expires_ms,
                    }))?;
                } else {
                    println!("{secret}");
                    eprintln!(
                        "token {} for {user}; it is shown only now (send it as `Authorization: Bearer TOKEN`)",
                        row.id
                    );
                }
            }
            TokenCommand::List { user } => {
                let tokens = state.tokens(user.as_deref()).await?;
                if ctx.json {
                    print_json(&tokens)?;
                } else {
                    for t in &tokens {
                        let exp = t.expires_ms.map_or("never".to_owned(), |e| {
                            chrono::DateTime::from_timestamp_millis(e)
                                .map(|d| d.to_rfc3339())
                                .unwrap_or_default()
                        });
                        println!("{:<14} {:<24} expires {exp}  {}", t.id, t.user, t.label);
                    }
                }
            }
            TokenCommand::Revoke { id } => {
                let id = id
                    .strip_prefix(auth::TOKEN_PREFIX)
                    .map_or(id.as_str(), |rest| rest.split('_').next().unwrap_or(rest));
                let Some(t) = state.token(id).await? else {
                    return Err(Error::not_found(format!("no token {id}")).into());
                };
                state.remove_token(id).await?;
                auth::audit(&state, &actor, "token.revoke", &t.user, id).await;
                println!("revoked token {id} of {}", t.user);
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
