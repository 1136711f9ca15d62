"""Migration 4: the webhooks outbox, written by triggers in the commit of each change.

Webhooks (SPEC §10; common/store/outbox.py). Triggers write the outbox, so an event is
committed with its change whatever path made it (the group commit, a reply's own INSERT,
a PATCH, the sweeper, a delete) and never without it. They write only on connections
that turned webhooks on (Store.open sets `fanout.webhooks`); elsewhere they cost one
setting read per row.
"""

VERSION = 4

SQL = """
        CREATE TABLE webhook_outbox (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            session_id uuid NOT NULL,
            type text NOT NULL,
            payload jsonb NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            attempts integer NOT NULL DEFAULT 0,
            next_attempt_at timestamptz NOT NULL DEFAULT now(),
            last_error text
        );
        -- The head of each session's queue, and the due ones.
        CREATE INDEX webhook_outbox_session ON webhook_outbox (session_id, id);
        CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at);
        CREATE TABLE webhook_dead_letters (
            id bigint PRIMARY KEY,
            session_id uuid NOT NULL,
            type text NOT NULL,
            payload jsonb NOT NULL,
            created_at timestamptz NOT NULL,
            attempts integer NOT NULL,
            last_error text,
            dead_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX webhook_dead_letters_recent ON webhook_dead_letters (dead_at DESC, id DESC);

        CREATE FUNCTION fanout_webhooks_on() RETURNS boolean LANGUAGE sql STABLE AS $fn$
            SELECT coalesce(current_setting('fanout.webhooks', true), '') = 'on'
        $fn$;
        CREATE FUNCTION fanout_session_event(s sessions, changes text[]) RETURNS jsonb
        LANGUAGE sql STABLE AS $fn$
            SELECT jsonb_build_object(
                'session', to_jsonb(s),
                'participants', coalesce((
                    SELECT jsonb_agg(p.user_id ORDER BY p.joined_at, p.user_id)
                    FROM participants p WHERE p.session_id = s.id), '[]'::jsonb),
                'changes', to_jsonb(changes))
        $fn$;

        CREATE FUNCTION fanout_outbox_message() RETURNS trigger LANGUAGE plpgsql AS $fn$
        BEGIN
            IF fanout_webhooks_on() THEN
                INSERT INTO webhook_outbox (session_id, type, payload)
                VALUES (NEW.session_id, 'message.created',
                        jsonb_build_object('message', to_jsonb(NEW)));
            END IF;
            RETURN NULL;
        END $fn$;
        CREATE TRIGGER webhook_message_created AFTER INSERT ON messages
            FOR EACH ROW EXECUTE FUNCTION fanout_outbox_message();

        CREATE FUNCTION fanout_outbox_session() RETURNS trigger LANGUAGE plpgsql AS $fn$
        DECLARE
            changes text[] := '{}';
        BEGIN
            IF NOT fanout_webhooks_on() THEN
                RETURN NULL;
            END IF;
            IF OLD.status IS DISTINCT FROM NEW.status THEN
                changes := array_append(changes, 'status');
            END IF;
            IF OLD.agent IS DISTINCT FROM NEW.agent THEN
                changes := array_append(changes, 'agent');
            END IF;
            INSERT INTO webhook_outbox (session_id, type, payload)
            VALUES (NEW.id, 'session.updated', fanout_session_event(NEW, changes));
            RETURN NULL;
        END $fn$;
        CREATE TRIGGER webhook_session_updated AFTER UPDATE OF status, agent ON sessions
            FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
                               OR OLD.agent IS DISTINCT FROM NEW.agent)
            EXECUTE FUNCTION fanout_outbox_session();

        -- BEFORE: the participants are still there (the cascade removes them after).
        CREATE FUNCTION fanout_outbox_deleted() RETURNS trigger LANGUAGE plpgsql AS $fn$
        BEGIN
            IF fanout_webhooks_on() THEN
                INSERT INTO webhook_outbox (session_id, type, payload)
                VALUES (OLD.id, 'session.deleted', fanout_session_event(OLD, '{}'));
            END IF;
            RETURN OLD;
        END $fn$;
        CREATE TRIGGER webhook_session_deleted BEFORE DELETE ON sessions
            FOR EACH ROW EXECUTE FUNCTION fanout_outbox_deleted();

        CREATE FUNCTION fanout_outbox_participants() RETURNS trigger LANGUAGE plpgsql AS $fn$
        DECLARE
            member participants := coalesce(NEW, OLD);
            s sessions;
        BEGIN
            IF NOT fanout_webhooks_on() THEN
                RETURN NULL;
            END IF;
            SELECT * INTO s FROM sessions WHERE id = member.session_id;
            -- No session: a cascade of its delete (session.deleted says it). Joined in
            -- the transaction that created the session (one now()): part of creating it.
            IF s.id IS NULL OR (TG_OP = 'INSERT' AND member.joined_at = s.created_at) THEN
                RETURN NULL;
            END IF;
            INSERT INTO webhook_outbox (session_id, type, payload)
            VALUES (s.id, 'session.updated', fanout_session_event(s, '{participants}'));
            RETURN NULL;
        END $fn$;
        CREATE TRIGGER webhook_participants_changed
            AFTER INSERT OR DELETE OR UPDATE OF role ON participants
            FOR EACH ROW EXECUTE FUNCTION fanout_outbox_participants();
        """
