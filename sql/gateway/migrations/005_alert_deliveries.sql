-- gateway 005: alert delivery. The leader forwards every alert and every
-- leadership transition to the sinks it is configured with (Telegram, a
-- Slack-compatible webhook, a generic JSON webhook), and records each delivery
-- here so that a failover loses none.
--
-- gateway.alert_sinks: the sinks the leaders were configured with (written by the
-- leader when elected). gateway.raise_alert adds a delivery per enabled sink in the
-- alert's own transaction, so an alert raised while nobody leads is queued all the
-- same; the leader adds the transitions (pgleader.leadership_history rows, whose
-- epochs commit in order) since each sink was enabled.
--
-- A delivery is claimed (attempts + 1, claimed_epoch) by a fenced statement before
-- it is sent, and its outcome is recorded after. A claim left by another epoch, or
-- an attempt without an answer, may have reached the sink: the next send says it is
-- a repeat. A sink gets at most one message per group interval (next_send_at):
-- whatever is due meanwhile goes out as one grouped message.

create table if not exists gateway.alert_sinks (
    sink          text primary key check (sink in ('telegram', 'slack', 'webhook')),
    enabled       boolean not null default true,
    election      text not null,
    -- transitions of this epoch and later are delivered (the epoch it was enabled in)
    since_epoch   bigint not null,
    -- when the sink may get its next message (grouping, and a 429's retry-after)
    next_send_at  timestamptz not null default now(),
    registered_at timestamptz not null default now(),
    registered_by text
);

create table if not exists gateway.alert_deliveries (
    id              bigint generated always as identity primary key,
    sink            text not null references gateway.alert_sinks (sink),
    -- the event: an alert, or a leadership transition (the epoch its leader gained)
    alert_id        bigint references gateway.alerts (id) on delete cascade,
    election        text,
    epoch           bigint,
    created_at      timestamptz not null default now(),
    attempts        integer not null default 0,
    next_attempt_at timestamptz not null default now(),
    -- the attempt under way: set by the claim, cleared when its outcome is recorded
    claimed_epoch   bigint,
    claimed_by      text,
    claimed_at      timestamptz,
    -- an attempt may have reached the sink without an answer (a leader died
    -- mid-send, a timeout): every later send is marked as a repeat
    maybe_sent      boolean not null default false,
    repeat          boolean not null default false,
    -- answers that refused it for good (a 4xx but 429): given up after a few
    refusals        integer not null default 0,
    -- the first delivery of the grouped message this one went out in (null: alone)
    group_id        bigint,
    delivered_at    timestamptz,
    failed_at       timestamptz,
    last_error      text,
    check ((alert_id is null) <> (epoch is null)),
    check ((epoch is null) = (election is null))
);
create unique index if not exists alert_deliveries_alert_idx
    on gateway.alert_deliveries (sink, alert_id) where alert_id is not null;
create unique index if not exists alert_deliveries_transition_idx
    on gateway.alert_deliveries (sink, election, epoch) where epoch is not null;
create index if not exists alert_deliveries_due_idx
    on gateway.alert_deliveries (sink, id) where delivered_at is null and failed_at is null;
