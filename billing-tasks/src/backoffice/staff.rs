//! Staff an admin manages (table `staff_user`), besides those configured in `BACKOFFICE_USERS`
//! (which the UI shows but cannot change). Each change is audited and takes effect at once on
//! this replica and within [`RELOAD_EVERY`] on the others: a disabled user's sessions end, and
//! so do a user's sessions when their role changes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use staff_auth::Role;

use super::actions::{Done, Refused, Staff, Why, note};
use super::text::Lang;
use super::{Backoffice, StaffRole};

/// How often every replica reads the staff table again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(30);

/// Shortest password accepted.
pub const MIN_PASSWORD: usize = 12;

/// A managed member of staff, as the staff page lists them.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StaffRow {
    pub name: String,
    pub role: String,
    pub disabled: bool,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A change to a managed member of staff.
#[derive(Debug, Clone)]
pub enum Change {
    Role(String),
    Disable,
    Enable,
    Password(String),
}

fn refuse(lang: Lang, ru: &str, en: &str) -> Refused {
    Refused(match lang {
        Lang::Ru => ru.to_owned(),
        Lang::En => en.to_owned(),
    })
}

fn check_password(lang: Lang, password: &str) -> Result<(), Refused> {
    if password.chars().count() < MIN_PASSWORD {
        return Err(Refused(match lang {
            Lang::Ru => format!("Пароль — не короче {MIN_PASSWORD} символов."),
            Lang::En => format!("The password needs at least {MIN_PASSWORD} characters."),
        }));
    }
    if password.len() > 1024 {
        return Err(refuse(
            lang,
            "Пароль слишком длинный.",
            "The password is too long.",
        ));
    }
    Ok(())
}

async fn hash(password: String) -> Result<String, Refused> {
    tokio::task::spawn_blocking(move || staff_auth::hash_password(&password))
        .await
        .map_err(|e| Refused(e.to_string()))?
        .map_err(Refused)
}

impl Backoffice {
    /// Reads the enabled managed staff into the sign-in; how many there are.
    pub async fn load_staff(&self) -> crate::Result<usize> {
        let rows: Vec<(String, String, String)> =
            sqlx::query_as("SELECT name, role, hash FROM staff_user WHERE NOT disabled")
                .fetch_all(self.billing.db())
                .await?;
        let users: Vec<(String, StaffRole, String)> = rows
            .into_iter()
            .filter_map(|(n, r, h)| StaffRole::parse(&r).map(|r| (n, r, h)))
            .collect();
        let n = users.len();
        self.guard.auth().set_managed(users);
        Ok(n)
    }

    /// Reads the staff table every [`RELOAD_EVERY`], starting now, while the runtime lives.
    pub fn spawn_staff_reload(&self) {
        let bo = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_EVERY);
            loop {
                tick.tick().await;
                if let Err(e) = bo.load_staff().await {
                    tracing::warn!(error = %e, "could not read the back-office staff");
                }
            }
        });
    }

    /// The managed staff, by name.
    pub async fn staff_rows(&self) -> crate::Result<Vec<StaffRow>> {
        Ok(sqlx::query_as::<_, StaffRow>(
            "SELECT name, role, disabled, created_by, created_at, updated_at FROM staff_user ORDER BY name",
        )
        .fetch_all(self.billing.db())
        .await?)
    }

    /// Adds a member of staff who signs in with `password`.
    pub async fn add_staff(
        &self,
        staff: &Staff,
        lang: Lang,
        name: &str,
        role: &str,
        password: &str,
        why: &Why,
    ) -> Result<Done, Refused> {
        let reason = why.check(lang)?;
        let name = name.trim();
        let valid_name = name.len() >= 2
            && name.len() <= 64
            && name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && name.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            });
        if !valid_name {
            return Err(refuse(
                lang,
                "Имя: 2–64 символа, строчные латинские буквы, цифры, точка, дефис, подчёркивание.",
                "The name: 2 to 64 lowercase Latin letters, digits, dots, dashes, underscores.",
            ));
        }
        let Some(role) = StaffRole::parse(role.trim()) else {
            return Err(refuse(lang, "Неизвестная роль.", "Unknown role."));
        };
        check_password(lang, password)?;
        if self.guard.auth().is_configured(name) {
            return Err(refuse(
                lang,
                "Такой пользователь задан в настройках (BACKOFFICE_USERS).",
                "That user is configured in BACKOFFICE_USERS.",
            ));
        }
        let hash = hash(password.to_owned()).await?;
        let mut tx = self.billing.db().begin().await?;
        let detail = json!({"name": name, "role": role.name()});
        if !note(
            &mut tx,
            staff,
            "staff.add",
            format!("staff:{name}"),
            &reason,
            detail,
            &why.key,
        )
        .await?
        {
            return Ok(Done::Repeated);
        }
        let now = self.billing.now();
        let inserted = sqlx::query(
            "INSERT INTO staff_user (name, role, hash, created_by, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $5)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(role.name())
        .bind(&hash)
        .bind(&staff.user)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(refuse(
                lang,
                "Такой пользователь уже есть.",
                "That user already exists.",
            ));
        }
        tx.commit().await?;
        self.load_staff().await?;
        Ok(Done::Done(format!("{name} ({})", role.name())))
    }

    /// Changes a managed member of staff: their role, a new password, disabled or enabled.
    /// Nobody disables or demotes themselves (an admin cannot lock the last admin out).
    pub async fn change_staff(
        &self,
        staff: &Staff,
        lang: Lang,
        name: &str,
        change: Change,
        why: &Why,
    ) -> Result<Done, Refused> {
        let reason = why.check(lang)?;
        let hashed = match &change {
            Change::Password(p) => {
                check_password(lang, p)?;
                Some(hash(p.clone()).await?)
            }
            Change::Role(r) if StaffRole::parse(r.trim()).is_none() => {
                return Err(refuse(lang, "Неизвестная роль.", "Unknown role."));
            }
            _ => None,
        };
        if name == staff.user && matches!(change, Change::Disable | Change::Role(_)) {
            return Err(refuse(
                lang,
                "Свою учётную запись не отключают и не понижают.",
                "You cannot disable or demote yourself.",
            ));
        }
        let mut tx = self.billing.db().begin().await?;
        let exists: Option<String> =
            sqlx::query_scalar("SELECT role FROM staff_user WHERE name = $1 FOR UPDATE")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        if exists.is_none() {
            return Err(refuse(
                lang,
                "Нет такого сотрудника (или он задан в настройках).",
                "No such managed user (configured users are changed in BACKOFFICE_USERS).",
            ));
        }
        let (action, detail) = match &change {
            Change::Role(r) => (
                "staff.role",
                json!({"name": name, "from": exists, "to": r.trim()}),
            ),
            Change::Disable => ("staff.disable", json!({"name": name})),
            Change::Enable => ("staff.enable", json!({"name": name})),
            Change::Password(_) => ("staff.password", json!({"name": name})),
        };
        if !note(
            &mut tx,
            staff,
            action,
            format!("staff:{name}"),
            &reason,
            detail,
            &why.key,
        )
        .await?
        {
            return Ok(Done::Repeated);
        }
        let now = self.billing.now();
        let q = match &change {
            Change::Role(r) => {
                sqlx::query("UPDATE staff_user SET role = $2, updated_at = $3 WHERE name = $1")
                    .bind(name)
                    .bind(r.trim().to_owned())
                    .bind(now)
            }
            Change::Disable => sqlx::query(
                "UPDATE staff_user SET disabled = true, updated_at = $2 WHERE name = $1",
            )
            .bind(name)
            .bind(now),
            Change::Enable => sqlx::query(
                "UPDATE staff_user SET disabled = false, updated_at = $2 WHERE name = $1",
            )
            .bind(name)
            .bind(now),
            Change::Password(_) => {
                sqlx::query("UPDATE staff_user SET hash = $2, updated_at = $3 WHERE name = $1")
                    .bind(name)
                    .bind(hashed.unwrap_or_default())
                    .bind(now)
            }
        };
        q.execute(&mut *tx).await?;
        tx.commit().await?;
        self.load_staff().await?;
        Ok(Done::Done(format!("{action} {name}")))
    }
}
