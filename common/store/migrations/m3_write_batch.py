"""Migration 3: fanout_write_batch_v1, the worker's group commit as one function.

A batch is one round trip (common/store/batch.py). A function is never edited in place:
a change is a new migration with a new name (v2), so workers of both versions run during
an upgrade. Each statement in it takes a fresh snapshot (READ COMMITTED, VOLATILE), so
what it reads after the lock is what the lock holder committed.
"""

VERSION = 3

SQL = """
        CREATE OR REPLACE FUNCTION fanout_write_batch_v1(
            chat_session uuid[], chat_client text[], chat_user text[], chat_device text[],
            chat_content text[], chat_metadata jsonb[],
            reply_session uuid[], reply_message bigint[], reply_client text[], reply_user text[],
            reply_content text[],
            -- The lifecycle rule for a message (common/store/lifecycle.py): an open status and
            -- the status a message leaves it in. A status not listed is closed.
            open_from text[], open_to text[],
            OUT message_ids bigint[], OUT sessions_locked sessions[],
            OUT sessions_touched sessions[], OUT session_members participants[],
            OUT inserted messages[], OUT existing messages[])
        LANGUAGE plpgsql
        -- Custom plans were made again on every call (the generic ones look costlier to
        -- the planner over arrays of unknown length), which doubled Postgres's CPU per
        -- batch; the generic plans are index lookups by key, right for any batch size.
        SET plan_cache_mode = force_generic_plan
        AS $fn$
        DECLARE
            locked_ids uuid[];
        BEGIN
            -- Lock the chats' sessions in id order (two batches never deadlock). A PATCH
            -- waits for this lock, or this waits for the PATCH's and then reads its result.
            SELECT coalesce(array_agg(l.id), '{}') INTO locked_ids FROM (
                SELECT id FROM sessions WHERE id = ANY(chat_session) ORDER BY id FOR UPDATE) AS l;
            -- Two ids per chat, ascending: chat k stores its message under ids[2k-1] and
            -- keeps ids[2k] for a reply, which so sorts right after the message it answers.
            message_ids := ARRAY(
                SELECT nextval(pg_get_serial_sequence('messages', 'id'))
                FROM generate_series(1, 2 * cardinality(chat_session)) ORDER BY 1);
            -- Every message once per (session, sender, client id). A chat whose session is
            -- gone is not stored; a sender who is not a participant writes as a user.
            WITH proposed AS (
                SELECT message_ids[2 * c.k - 1] AS id, c.session_id, c.client_msg_id,
                       coalesce(p.role, 'user') AS role, c.user_id, c.device_id, c.content,
                       c.metadata, c.k
                FROM unnest(chat_session, chat_client, chat_user, chat_device, chat_content,
                            chat_metadata) WITH ORDINALITY
                     AS c(session_id, client_msg_id, user_id, device_id, content, metadata, k)
                LEFT JOIN participants p ON p.session_id = c.session_id AND p.user_id = c.user_id
                WHERE c.session_id = ANY(locked_ids)
                UNION ALL
                SELECT r.id, r.session_id, r.client_msg_id, 'assistant', r.user_id, NULL, r.content,
                       NULL, cardinality(chat_session) + r.k
                FROM unnest(reply_message, reply_session, reply_client, reply_user, reply_content)
                     WITH ORDINALITY AS r(id, session_id, client_msg_id, user_id, content, k)
            ), stored AS (
                INSERT INTO messages AS m
                    (id, session_id, client_msg_id, role, user_id, device_id, content, metadata)
                SELECT id, session_id, client_msg_id, role, user_id, device_id, content, metadata
                FROM proposed ORDER BY k
                ON CONFLICT (session_id, user_id, client_msg_id) DO NOTHING
                RETURNING m
            )
            SELECT coalesce(array_agg(stored.m), '{}') INTO inserted FROM stored;
            -- Stored before (a re-processed entry, a retried reply): the first row stands. A
            -- statement of its own, so it sees a row that a concurrent writer committed
            -- while the insert waited on it.
            SELECT coalesce(array_agg(m), '{}') INTO existing
            FROM messages m JOIN (
                SELECT * FROM unnest(chat_session, chat_user, chat_client)
                UNION ALL
                SELECT * FROM unnest(reply_session, reply_user, reply_client)
                EXCEPT
                SELECT i.session_id, i.user_id, i.client_msg_id FROM unnest(inserted) AS i
            ) AS k(session_id, user_id, client_msg_id) USING (session_id, user_id, client_msg_id);
            -- Activity on each open locked session that got a new message: the TTL starts
            -- again and the status moves as the rule says (a change bumps the version). The
            -- other subqueries see the sessions as locked, not as this UPDATE leaves them.
            WITH moved AS (
                UPDATE sessions s SET
                    last_activity_at = now(),
                    expires_at = now() + s.ttl * interval '1 second',
                    status = t.status_to,
                    version = s.version + (t.status_to <> s.status)::int,
                    updated_at = CASE WHEN t.status_to <> s.status THEN now() ELSE s.updated_at END
                FROM unnest(open_from, open_to) AS t(status_from, status_to)
                WHERE s.id = ANY(locked_ids) AND s.status = t.status_from
                  AND s.id IN (SELECT i.session_id FROM unnest(inserted) AS i)
                RETURNING s
            )
            SELECT (SELECT coalesce(array_agg(s ORDER BY s.id), '{}') FROM sessions s
                    WHERE s.id = ANY(locked_ids)),
                   (SELECT coalesce(array_agg(moved.s), '{}') FROM moved),
                   (SELECT coalesce(array_agg(p ORDER BY p.joined_at, p.user_id), '{}')
                    FROM participants p WHERE p.session_id = ANY(locked_ids))
            INTO sessions_locked, sessions_touched, session_members;
        END
        $fn$;
        """
