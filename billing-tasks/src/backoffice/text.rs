//! The back-office's words in Russian (the staff's language, the default) and English. A page's
//! language comes from `?lang=` or the `bo_lang` cookie.

/// A page language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lang {
    #[default]
    Ru,
    En,
}

impl Lang {
    /// From `ru`/`en`.
    pub fn parse(s: &str) -> Option<Lang> {
        match s.trim() {
            "ru" => Some(Lang::Ru),
            "en" => Some(Lang::En),
            _ => None,
        }
    }

    /// The code.
    pub fn code(self) -> &'static str {
        match self {
            Lang::Ru => "ru",
            Lang::En => "en",
        }
    }

    /// The other one, for the switch.
    pub fn other(self) -> Lang {
        match self {
            Lang::Ru => Lang::En,
            Lang::En => Lang::Ru,
        }
    }

    /// The word for `key`; the key itself when it has none (a test checks every key the
    /// templates use).
    pub fn get(self, key: &str) -> &'static str {
        match WORDS.iter().find(|(k, _, _)| *k == key) {
            Some((_, ru, en)) => match self {
                Lang::Ru => ru,
                Lang::En => en,
            },
            None => "??",
        }
    }

    /// Whether `key` has words.
    pub fn knows(key: &str) -> bool {
        WORDS.iter().any(|(k, _, _)| *k == key)
    }
}

/// `(key, Russian, English)`.
pub const WORDS: &[(&str, &str, &str)] = &[
    ("title", "Биллинг · бэк-офис", "Billing back-office"),
    ("home", "Главная", "Home"),
    ("search", "Поиск", "Search"),
    (
        "search_hint",
        "id плательщика, подписки, счёта, платежа; TransactionId; последние 4 цифры карты и срок (4242 12/27); сумма (499,00); дата (2026-12-01)",
        "payer, subscription, invoice or payment id; TransactionId; card last four and expiry (4242 12/27); amount (499.00); date (2026-12-01)",
    ),
    ("payments", "Платежи", "Payments"),
    ("invoices", "Счета", "Invoices"),
    ("refunds", "Возвраты", "Refunds"),
    ("subscriptions", "Подписки", "Subscriptions"),
    ("attention", "Требуют внимания", "Need a person"),
    (
        "notifications",
        "Уведомления шлюза",
        "Gateway notifications",
    ),
    ("reports", "Отчёты", "Reports"),
    ("audit", "Журнал действий", "Audit log"),
    ("staff", "Сотрудники", "Staff"),
    ("sign_out", "Выйти", "Sign out"),
    ("payer", "Плательщик", "Payer"),
    ("payers", "Плательщики", "Payers"),
    ("email", "Эл. почта", "Email"),
    ("cards", "Карты", "Cards"),
    ("card", "Карта", "Card"),
    ("expiry", "Срок", "Expiry"),
    ("status", "Статус", "Status"),
    ("amount", "Сумма", "Amount"),
    ("amount_from", "Сумма от", "Amount from"),
    ("amount_to", "Сумма до", "Amount to"),
    ("date_from", "С даты", "From"),
    ("date_to", "По дату", "To"),
    ("reason_code", "Код причины", "Reason code"),
    ("tariff", "Тариф", "Tariff"),
    ("created", "Создан", "Created"),
    ("period", "Период", "Period"),
    ("renews", "Продление", "Renews"),
    ("past_due", "Просрочена", "Past due"),
    ("auto_renew", "Автопродление", "Auto-renew"),
    ("yes", "да", "yes"),
    ("no", "нет", "no"),
    ("any", "любой", "any"),
    ("filter", "Показать", "Filter"),
    ("export_csv", "Выгрузить CSV", "Export CSV"),
    ("next_page", "Дальше →", "Next →"),
    ("nothing", "Ничего не найдено.", "Nothing found."),
    ("timeline", "История", "Timeline"),
    ("when", "Когда", "When"),
    ("what", "Что", "What"),
    ("who", "Кто", "Who"),
    ("why", "Почему", "Why"),
    ("outbox", "Исходящие сообщения", "Outbox messages"),
    ("task_runs", "Задачи в мониторе", "Task runs in the monitor"),
    ("staff_actions", "Действия сотрудников", "Staff actions"),
    ("refund", "Вернуть", "Refund"),
    ("refund_amount", "Сумма возврата, ₽", "Refund amount, ₽"),
    ("refundable", "Можно вернуть", "Refundable"),
    ("reason", "Причина", "Reason"),
    ("note", "Комментарий", "Note"),
    ("submit", "Выполнить", "Do it"),
    (
        "cancel_period_end",
        "Отменить в конце периода",
        "Cancel at period end",
    ),
    ("cancel_now", "Отменить сейчас", "Cancel now"),
    ("extend", "Продлить на дней", "Extend by days"),
    (
        "retry_renewal",
        "Повторить списание",
        "Retry the renewal now",
    ),
    (
        "resend_role",
        "Переотправить роль",
        "Resend the role change",
    ),
    ("resolve", "Отметить решённым", "Mark resolved"),
    ("redeliver", "Отправить снова", "Deliver again"),
    ("approve", "Одобрить", "Approve"),
    ("reject", "Отклонить", "Reject"),
    (
        "approvals",
        "Возвраты на одобрении",
        "Refunds awaiting approval",
    ),
    (
        "stuck",
        "Платежи в обработке дольше срока",
        "Payments stuck in processing",
    ),
    (
        "unmatched",
        "Неопознанные уведомления шлюза",
        "Unmatched gateway notifications",
    ),
    (
        "mismatches",
        "Расхождения сверки",
        "Reconciliation mismatches",
    ),
    (
        "dead_outbox",
        "Недоставленные сообщения",
        "Dead outbox messages",
    ),
    ("requested_by", "Запросил", "Requested by"),
    ("hmac", "Подпись", "HMAC"),
    ("answer", "Наш ответ", "Our answer"),
    ("ledger_change", "Изменение в реестре", "Ledger change"),
    ("kind", "Тип", "Kind"),
    ("daily", "По дням", "Daily"),
    ("monthly", "По месяцам", "Monthly"),
    ("charged", "Списано", "Charged"),
    ("refunded", "Возвращено", "Refunded"),
    ("net", "Итого", "Net"),
    ("count", "Кол-во", "Count"),
    (
        "reconciliation",
        "Сверка со шлюзом",
        "Reconciliation with the gateway",
    ),
    ("findings", "Расхождения", "Findings"),
    ("resolved", "Решено", "Resolved"),
    ("done", "Готово.", "Done."),
    (
        "already_done",
        "Это уже сделано (повторная отправка формы).",
        "Already done (the form was sent twice).",
    ),
    (
        "awaiting_approval",
        "Возврат выше порога ждёт одобрения второго сотрудника.",
        "The refund is above the threshold and waits for a second person's approval.",
    ),
    ("language", "English", "Русский"),
    ("role", "Роль", "Role"),
    ("user", "Пользователь", "User"),
    ("attempt", "Попытка", "Attempt"),
    ("transaction", "TransactionId", "TransactionId"),
    ("id", "id", "id"),
    ("topic", "Тема", "Topic"),
    ("attempts", "Попыток", "Attempts"),
    ("last_error", "Последняя ошибка", "Last error"),
    ("days", "дней", "days"),
    (
        "approval_threshold",
        "Порог одобрения",
        "Approval threshold",
    ),
    ("reason_duplicate", "Двойное списание", "Duplicate charge"),
    ("reason_service", "Проблема с сервисом", "Service problem"),
    ("reason_goodwill", "Жест доброй воли", "Goodwill"),
    ("reason_fraud", "Мошенничество", "Fraud"),
    ("reason_request", "Просьба клиента", "Customer's request"),
    ("reason_error", "Ошибка сотрудника", "Staff error"),
    ("reason_gateway", "Ошибка шлюза", "Gateway error"),
    ("reason_other", "Другое", "Other"),
    ("total", "Всего", "Total"),
    ("error", "Ошибка", "Error"),
    ("back", "Назад", "Back"),
    (
        "staff_managed",
        "Сотрудники, заведённые здесь",
        "Staff managed here",
    ),
    (
        "staff_configured",
        "Заданы в настройках (BACKOFFICE_USERS)",
        "Configured (BACKOFFICE_USERS)",
    ),
    ("disabled", "отключён", "disabled"),
    ("enabled", "активен", "enabled"),
    ("change_role", "Сменить роль", "Change the role"),
    (
        "new_password",
        "Новый пароль (от 12 символов)",
        "New password (12+ characters)",
    ),
    ("set_password", "Задать пароль", "Set the password"),
    ("enable", "Включить", "Enable"),
    ("disable", "Отключить", "Disable"),
    ("add_staff", "Добавить сотрудника", "Add a member of staff"),
    (
        "no_card_data",
        "Данные карт не хранятся: только маска и срок.",
        "No card data is kept: the mask and expiry only.",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_the_templates_use_exists_in_both_languages() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/templates/admin");
        let mut missing = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            for part in text.split("t.get(\"").skip(1) {
                let key = part.split('"').next().unwrap();
                if !Lang::knows(key) {
                    missing.push(format!("{}: {key}", path.display()));
                }
            }
        }
        assert!(missing.is_empty(), "words missing: {missing:?}");
        for (k, ru, en) in WORDS {
            assert!(!ru.is_empty() && !en.is_empty(), "{k}");
        }
    }
}
