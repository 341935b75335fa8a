// sbemu/broker.cpp
//   Message store semantics, following Service Bus: a lock token per delivery, delivery count
//   incremented whenever a lock ends without completion, dead-lettering at MaxDeliveryCount and
//   (when configured) on expiry, deferral, scheduling, duplicate detection and sessions.
#include "broker.hpp"

#include "util.hpp"

#include <algorithm>
#include <cstring>

namespace sbemu {

const char *
MsgStateName(MsgState s) {
	switch (s) {
	case MsgState::Active:
		return "active";
	case MsgState::Locked:
		return "locked";
	case MsgState::Deferred:
		return "deferred";
	case MsgState::Scheduled:
		return "scheduled";
	}
	return "?";
}

namespace {

// Annotations owned by the service: a sender's values for them are dropped.
bool
ServiceOwnedAnnotation(const std::string &key) {
	static const char *owned[] = {"x-opt-sequence-number",         "x-opt-enqueued-time",         "x-opt-locked-until",
	                              "x-opt-message-state",           "x-opt-deadletter-source",     "x-opt-lock-token",
	                              "x-opt-enqueue-sequence-number", "x-opt-scheduled-enqueue-time"};
	for (const char *o : owned)
		if (key == o)
			return true;
	return false;
}

std::string
ListText(const amqp::Value &list, size_t idx) {
	if (list.kind != amqp::Value::Kind::List || idx >= list.items.size())
		return std::string();
	return list.items[idx].ToText();
}

// Rebuilds a bare message with its application properties changed.
std::shared_ptr<const std::string>
RewriteAppProps(const std::string &bare, const std::vector<std::pair<std::string, amqp::Value>> &set,
                const amqp::Value *merge) {
	amqp::Sections sec;
	std::string err;
	if (!amqp::SplitSections(bare, &sec, &err))
		return nullptr;
	amqp::Value props = amqp::Value::Map();
	if (!sec.application_properties.empty())
		amqp::DecodeSection(sec.application_properties, &props);
	if (props.kind != amqp::Value::Kind::Map)
		props = amqp::Value::Map();
	if (merge && merge->kind == amqp::Value::Kind::Map)
		for (size_t k = 0; k + 1 < merge->items.size(); k += 2)
			if (merge->items[k].IsText())
				props.Put(amqp::Value::String(merge->items[k].s), merge->items[k + 1]);
	for (auto &kv : set)
		props.Put(amqp::Value::String(kv.first), kv.second);
	auto out = std::make_shared<std::string>();
	out->append(sec.properties.data(), sec.properties.size());
	amqp::EncodeSection(amqp::kApplicationProperties, props, out.get());
	out->append(sec.body.data(), sec.body.size());
	return out;
}

// Reads what filters need from a stored bare message.
void
FilterInputFromBare(const std::string &bare, FilterInput *fi, amqp::Value *app_props) {
	amqp::Sections sec;
	std::string err;
	if (!amqp::SplitSections(bare, &sec, &err))
		return;
	amqp::Value p;
	if (!sec.properties.empty() && amqp::DecodeSection(sec.properties, &p)) {
		fi->message_id = ListText(p, amqp::kMessageId);
		fi->to = ListText(p, amqp::kTo);
		fi->subject = ListText(p, amqp::kSubject);
		fi->reply_to = ListText(p, amqp::kReplyTo);
		fi->correlation_id = ListText(p, amqp::kCorrelationId);
		fi->content_type = ListText(p, amqp::kContentType);
		fi->session_id = ListText(p, amqp::kGroupId);
		fi->reply_to_session_id = ListText(p, amqp::kReplyToGroupId);
	}
	if (!sec.application_properties.empty() && amqp::DecodeSection(sec.application_properties, app_props))
		fi->app_props = app_props;
}

int64_t
SatAdd(int64_t a, int64_t b) {
	if (b >= kNever - a)
		return kNever;
	return a + b;
}

} // namespace

bool
ParseIncoming(std::string_view encoded, Incoming *out, std::string *err) {
	amqp::Sections sec;
	if (!amqp::SplitSections(encoded, &sec, err))
		return false;
	if (!sec.header.empty()) {
		amqp::Value h;
		if (!amqp::DecodeSection(sec.header, &h) || h.kind != amqp::Value::Kind::List) {
			*err = "malformed message header";
			return false;
		}
		if (h.items.size() > 0 && h.items[0].kind == amqp::Value::Kind::Bool)
			out->durable = h.items[0].u != 0;
		if (h.items.size() > 1 && h.items[1].IsInteger())
			out->priority = static_cast<uint8_t>(h.items[1].AsInt());
		if (h.items.size() > 2 && h.items[2].IsInteger())
			out->ttl_ms = h.items[2].AsInt();
	}
	if (!sec.message_annotations.empty()) {
		amqp::Value ma;
		if (!amqp::DecodeSection(sec.message_annotations, &ma) || ma.kind != amqp::Value::Kind::Map) {
			*err = "malformed message-annotations";
			return false;
		}
		for (size_t k = 0; k + 1 < ma.items.size(); k += 2) {
			const amqp::Value &key = ma.items[k], &val = ma.items[k + 1];
			std::string name = key.IsText() ? key.s : std::string();
			if (name == "x-opt-scheduled-enqueue-time" && !val.IsNull())
				out->scheduled_ms = val.AsInt();
			if (name == "x-opt-partition-key" && val.IsText())
				out->partition_key = val.s;
			if (!name.empty() && ServiceOwnedAnnotation(name))
				continue;
			amqp::Encode(key, &out->annotations);
			amqp::Encode(val, &out->annotations);
			out->annotation_count += 2;
		}
	}
	amqp::Value props = amqp::Value::List();
	bool rebuild = false;
	if (!sec.properties.empty()) {
		if (!amqp::DecodeSection(sec.properties, &props) || props.kind != amqp::Value::Kind::List) {
			*err = "malformed message properties";
			return false;
		}
	}
	if (props.items.empty() || props.items[0].IsNull()) {
		// Service Bus assigns a message-id when the sender gives none.
		std::string id = NewGuid();
		id.erase(std::remove(id.begin(), id.end(), '-'), id.end());
		if (props.items.empty())
			props.items.emplace_back();
		props.items[0] = amqp::Value::String(id);
		rebuild = true;
	}
	out->message_id = ListText(props, amqp::kMessageId);
	out->to = ListText(props, amqp::kTo);
	out->subject = ListText(props, amqp::kSubject);
	out->reply_to = ListText(props, amqp::kReplyTo);
	out->correlation_id = ListText(props, amqp::kCorrelationId);
	out->content_type = ListText(props, amqp::kContentType);
	out->session_id = ListText(props, amqp::kGroupId);
	out->reply_to_session_id = ListText(props, amqp::kReplyToGroupId);
	if (out->message_id.size() > 128) {
		*err = "message-id is longer than 128 characters";
		return false;
	}
	if (out->session_id.size() > 128) {
		*err = "session-id (group-id) is longer than 128 characters";
		return false;
	}
	auto bare = std::make_shared<std::string>();
	if (rebuild) {
		amqp::EncodeSection(amqp::kProperties, props, bare.get());
		bare->append(sec.application_properties.data(), sec.application_properties.size());
		bare->append(sec.body.data(), sec.body.size());
	} else {
		bare->assign(sec.bare.data(), sec.bare.size());
	}
	out->size = bare->size();
	out->bare = std::move(bare);
	return true;
}

const char *
Entity::KindName() const {
	switch (kind) {
	case Kind::Queue:
		return "queue";
	case Kind::Topic:
		return "topic";
	case Kind::Subscription:
		return "subscription";
	case Kind::DeadLetter:
		return "deadletter";
	}
	return "?";
}

size_t
Entity::SessionsLocked() const {
	size_t n = 0;
	for (const auto &kv : groups)
		n += kv.second.owner != nullptr;
	return n;
}

std::string
Entity::CountsJson() const {
	char buf[1536];
	std::snprintf(buf, sizeof buf,
	              "{\"name\":\"%s\",\"kind\":\"%s\",\"messages\":%zu,\"active\":%zu,\"locked\":%zu,\"scheduled\":%zu,"
	              "\"deferred\":%zu,\"dead_lettered\":%zu,\"sent\":%llu,\"delivered\":%llu,\"completed\":%llu,"
	              "\"abandoned\":%llu,\"deferrals\":%llu,\"dead_letter_moves\":%llu,\"expired\":%llu,"
	              "\"lock_renewals\":%llu,\"lock_lost\":%llu,\"lock_expired\":%llu,\"released_by_detach\":%llu,"
	              "\"duplicates\":%llu,\"put_tokens\":%llu,\"scheduled_total\":%llu,\"cancelled\":%llu,"
	              "\"sessions\":%zu,\"sessions_locked\":%zu,\"consumers\":%zu,\"max_locked_by_link\":%llu,"
	              "\"max_sessions_locked\":%llu}",
	              JsonEscape(name).c_str(), KindName(), msgs.size(), n_active, n_locked, n_scheduled, n_deferred,
	              dlq ? dlq->msgs.size() : static_cast<size_t>(0), (unsigned long long)counters.sent,
	              (unsigned long long)counters.delivered, (unsigned long long)counters.completed,
	              (unsigned long long)counters.abandoned, (unsigned long long)counters.deferred,
	              (unsigned long long)counters.dead_lettered, (unsigned long long)counters.expired,
	              (unsigned long long)counters.lock_renewals, (unsigned long long)counters.lock_lost,
	              (unsigned long long)counters.lock_expired, (unsigned long long)counters.released_by_detach,
	              (unsigned long long)counters.duplicates, (unsigned long long)counters.put_tokens,
	              (unsigned long long)counters.scheduled, (unsigned long long)counters.cancelled,
	              SessionsEnabled() ? groups.size() : static_cast<size_t>(0), SessionsLocked(), consumers.size(),
	              (unsigned long long)counters.max_locked_by_link, (unsigned long long)counters.max_sessions_locked);
	return buf;
}

Broker::Broker(const NamespaceConfig &cfg) : ns_name_(cfg.name) {
	for (auto &q : cfg.queues) {
		Entity *e = NewEntity(q.name, Entity::Kind::Queue, q.props);
		e->dlq = NewEntity(q.name + "/$DeadLetterQueue", Entity::Kind::DeadLetter, q.props);
		e->dlq->owner = e;
	}
	for (auto &t : cfg.topics) {
		Entity *topic = NewEntity(t.name, Entity::Kind::Topic, t.props);
		for (auto &s : t.subscriptions) {
			Entity *sub = NewEntity(t.name + "/Subscriptions/" + s.name, Entity::Kind::Subscription, s.props);
			sub->owner = topic;
			sub->rules = s.rules;
			sub->dlq = NewEntity(sub->name + "/$DeadLetterQueue", Entity::Kind::DeadLetter, s.props);
			sub->dlq->owner = sub;
			topic->subscriptions.push_back(sub);
		}
	}
}

Entity *
Broker::NewEntity(const std::string &name, Entity::Kind kind, const EntityProps &props) {
	auto e = std::make_unique<Entity>();
	e->name = name;
	e->key = ToLower(name);
	e->kind = kind;
	e->props = props;
	Entity *raw = e.get();
	by_key_[raw->key] = raw;
	entities_.push_back(std::move(e));
	return raw;
}

Entity *
Broker::Find(std::string_view address) {
	std::string_view s = address;
	size_t scheme = s.find("://");
	if (scheme != std::string_view::npos) {
		s = s.substr(scheme + 3);
		size_t slash = s.find('/');
		s = slash == std::string_view::npos ? std::string_view() : s.substr(slash);
	}
	while (!s.empty() && s.front() == '/')
		s.remove_prefix(1);
	while (!s.empty() && s.back() == '/')
		s.remove_suffix(1);
	auto it = by_key_.find(ToLower(s));
	return it == by_key_.end() ? nullptr : it->second;
}

std::vector<Entity *>
Broker::All() {
	std::vector<Entity *> out;
	for (auto &e : entities_)
		out.push_back(e.get());
	return out;
}

void
Broker::SetState(Entity &e, StoredMessage &m, MsgState s) {
	auto counter = [&](MsgState st) -> size_t & {
		switch (st) {
		case MsgState::Active:
			return e.n_active;
		case MsgState::Locked:
			return e.n_locked;
		case MsgState::Deferred:
			return e.n_deferred;
		default:
			return e.n_scheduled;
		}
	};
	--counter(m.state);
	m.state = s;
	++counter(s);
}

SessionGroup *
Broker::Session(Entity &e, const std::string &id, bool create) {
	auto it = e.groups.find(id);
	if (it != e.groups.end())
		return &it->second;
	if (!create)
		return nullptr;
	return &e.groups[id];
}

Broker::SendResult
Broker::Send(Entity &target, Incoming &&in, int64_t now) {
	SendResult r;
	if (!target.CanSend()) {
		r.ok = false;
		r.condition = "amqp:not-allowed";
		r.description = "Cannot send to " + target.name + ": only queues and topics accept messages.";
		return r;
	}
	if (target.kind == Entity::Kind::Queue && target.props.requires_session && in.session_id.empty()) {
		r.ok = false;
		r.condition = "amqp:not-allowed";
		r.description = "The SessionId was not set on a message, and it cannot be sent to the entity '" + target.name +
		                "'. Entities that have session support enabled can only receive messages that have the "
		                "SessionId set to a valid value.";
		return r;
	}
	if (target.props.requires_duplicate_detection && !in.message_id.empty()) {
		auto it = target.dup_ids.find(in.message_id);
		if (it != target.dup_ids.end() && SatAdd(it->second, target.props.duplicate_window_ms) > now) {
			++target.counters.duplicates;
			r.duplicate = true;
			return r;
		}
		target.dup_ids[in.message_id] = now;
		target.dup_order.emplace_back(now, in.message_id);
	}
	StoredMessage m;
	m.bare = std::move(in.bare);
	m.annotations = std::move(in.annotations);
	m.annotation_count = in.annotation_count;
	m.durable = in.durable;
	m.priority = in.priority;
	m.ttl_ms = in.ttl_ms;
	m.message_id = std::move(in.message_id);
	m.session_id = std::move(in.session_id);
	m.scheduled_ms = in.scheduled_ms > now ? in.scheduled_ms : 0;
	m.size = in.size;
	++target.counters.sent;
	if (m.scheduled_ms)
		++target.counters.scheduled;
	// The sequence number the message actually got: that of the queue it was forwarded to, if any.
	r.seq = Forward(target, m, now, 0);
	return r;
}

// Routes a message into `target` (a queue or topic), assigning its sequence number there.
// Returns that sequence number (the topic's for a topic), 0 when the message was not stored.
uint64_t
Broker::Forward(Entity &target, const StoredMessage &proto, int64_t now, int hops) {
	if (hops > 0)
		++target.counters.sent;
	if (!target.props.forward_to.empty() && hops < kMaxForwardHops) {
		Entity *next = Find(target.props.forward_to);
		if (next && next != &target && next->CanSend())
			return Forward(*next, proto, now, hops + 1);
	}
	StoredMessage m = proto;
	m.seq = target.next_seq++;
	m.enqueued_ms = 0;
	m.state = MsgState::Active;
	m.deferred = false;
	m.delivery_count = hops > 0 ? 0 : m.delivery_count;
	if (target.kind == Entity::Kind::Topic) {
		FilterInput fi;
		amqp::Value app_props;
		bool need_input = false;
		for (Entity *sub : target.subscriptions)
			for (auto &rule : sub->rules)
				if (rule.kind == Rule::Kind::Correlation || rule.kind == Rule::Kind::Sql)
					need_input = true;
		if (need_input)
			FilterInputFromBare(*m.bare, &fi, &app_props);
		fi.sequence_number = m.seq;
		fi.enqueued_ms = now;
		for (Entity *sub : target.subscriptions) {
			bool match = sub->rules.empty();
			for (auto &rule : sub->rules)
				if (rule.Match(fi)) {
					match = true;
					break;
				}
			if (!match)
				continue;
			if (!sub->props.forward_to.empty() && hops < kMaxForwardHops) {
				Entity *next = Find(sub->props.forward_to);
				if (next && next->CanSend()) {
					++sub->counters.sent;
					Forward(*next, m, now, hops + 1);
					continue;
				}
			}
			++sub->counters.sent;
			StoredMessage copy = m;
			if (sub->props.requires_session && copy.session_id.empty()) {
				// Service Bus dead-letters such a message in the subscription.
				Store(*sub, std::move(copy), now);
				auto it = sub->msgs.find(m.seq);
				if (it != sub->msgs.end())
					MoveToDeadLetter(*sub, it, "SessionIdIsNull",
					                 "The message has no SessionId, but the subscription requires sessions.", nullptr,
					                 now, hops);
				continue;
			}
			Store(*sub, std::move(copy), now);
		}
		return m.seq;
	}
	if (target.props.requires_session && m.session_id.empty())
		return 0;
	uint64_t seq = m.seq;
	Store(target, std::move(m), now);
	return seq;
}

void
Broker::Store(Entity &e, StoredMessage &&m, int64_t now) {
	if (!m.enqueued_ms)
		m.enqueued_ms = now;
	m.lock_owner = nullptr;
	m.locked_until = 0;
	uint64_t seq = m.seq;
	std::string sid = e.SessionsEnabled() ? m.session_id : std::string();
	bool scheduled = m.scheduled_ms > now;
	auto res = e.msgs.emplace(seq, std::move(m));
	if (!res.second)
		return; // a sequence number never repeats within an entity
	StoredMessage &sm = res.first->second;
	if (e.kind != Entity::Kind::DeadLetter) {
		int64_t ttl = sm.ttl_ms > 0 ? std::min<int64_t>(sm.ttl_ms, e.props.default_ttl_ms) : e.props.default_ttl_ms;
		sm.expires_ms = SatAdd(scheduled ? sm.scheduled_ms : sm.enqueued_ms, ttl);
		if (sm.expires_ms != kNever)
			ttl_timers_.push({sm.expires_ms, &e, seq, 0});
	} else {
		sm.expires_ms = kNever; // the dead-letter queue ignores time-to-live
	}
	SessionGroup &g = *Session(e, sid, true);
	++g.messages;
	if (scheduled) {
		sm.state = MsgState::Scheduled;
		++e.n_scheduled;
		schedule_timers_.push({sm.scheduled_ms, &e, seq, 0});
		return;
	}
	sm.state = MsgState::Active;
	++e.n_active;
	g.available.insert(seq);
	NotifyAvailable(e, sid);
}

void
Broker::NotifyAvailable(Entity &e, const std::string &sid) {
	for (Consumer *c : e.consumers) {
		if (c->Credit() == 0)
			continue;
		if (e.SessionsEnabled()) {
			if (c->session_bound && c->session_id == sid)
				c->Wake();
		} else {
			c->Wake();
		}
	}
	if (e.SessionsEnabled()) {
		SessionGroup *g = Session(e, sid, false);
		if (g && !g->owner && on_session_available)
			on_session_available(e);
	}
}

void
Broker::AddConsumer(Entity &e, Consumer *c) {
	e.consumers.push_back(c);
}

void
Broker::Pump(Consumer &c, Entity &e, int64_t now) {
	if (e.SessionsEnabled() && !c.session_bound)
		return;
	SessionGroup *g = Session(e, e.SessionsEnabled() ? c.session_id : std::string(), false);
	if (!g)
		return;
	if (e.SessionsEnabled() && g->owner != &c)
		return;
	const std::string sid = e.SessionsEnabled() ? c.session_id : std::string();
	while (c.Credit() > 0 && (g = Session(e, sid, false)) && !g->available.empty()) {
		uint64_t seq = *g->available.begin();
		g->available.erase(g->available.begin());
		auto it = e.msgs.find(seq);
		if (it == e.msgs.end())
			continue;
		StoredMessage &m = it->second;
		if (m.expires_ms <= now) {
			Expire(e, it, now);
			continue;
		}
		++e.counters.delivered;
		if (c.PeekLock()) {
			SetState(e, m, MsgState::Locked);
			GrantLock(e, m, &c);
			if (e.SessionsEnabled()) {
				m.locked_until = g->locked_until;
			} else {
				m.locked_until = now + e.props.lock_duration_ms;
				lock_timers_.push({m.locked_until, &e, seq, m.lock_gen});
			}
			e.locks[m.lock] = seq;
			c.Deliver(e, m);
		} else {
			c.Deliver(e, m);
			Remove(e, it);
		}
	}
}

void
Broker::Remove(Entity &e, std::map<uint64_t, StoredMessage>::iterator it) {
	StoredMessage &m = it->second;
	std::string sid = e.SessionsEnabled() ? m.session_id : std::string();
	SessionGroup *g = Session(e, sid, false);
	switch (m.state) {
	case MsgState::Active:
		--e.n_active;
		if (g)
			g->available.erase(m.seq);
		break;
	case MsgState::Locked:
		--e.n_locked;
		e.locks.erase(m.lock);
		ForgetOwner(e, m);
		break;
	case MsgState::Deferred:
		--e.n_deferred;
		break;
	case MsgState::Scheduled:
		--e.n_scheduled;
		break;
	}
	if (g) {
		--g->messages;
		// Session groups are dropped when nothing refers to them; the entity's own group stays.
		if (!sid.empty() && g->messages == 0 && !g->owner && !g->has_state)
			e.groups.erase(sid);
	}
	e.msgs.erase(it);
}

void
Broker::GrantLock(Entity &e, StoredMessage &m, const void *owner) {
	RandomBytes(m.lock.data(), 16);
	m.lock_owner = owner;
	++m.lock_gen;
	size_t held = ++e.locked_by_owner[owner];
	if (held > e.counters.max_locked_by_link)
		e.counters.max_locked_by_link = held;
}

void
Broker::ForgetOwner(Entity &e, const StoredMessage &m) {
	if (!m.lock_owner)
		return;
	auto it = e.locked_by_owner.find(m.lock_owner);
	if (it == e.locked_by_owner.end())
		return;
	if (--it->second == 0)
		e.locked_by_owner.erase(it);
}

void
Broker::Unlock(Entity &e, StoredMessage &m) {
	e.locks.erase(m.lock);
	ForgetOwner(e, m);
	m.lock_owner = nullptr;
	m.locked_until = 0;
	++m.lock_gen;
}

void
Broker::MakeAvailable(Entity &e, StoredMessage &m, int64_t now) {
	if (m.deferred) {
		SetState(e, m, MsgState::Deferred);
		return;
	}
	(void)now;
	SetState(e, m, MsgState::Active);
	std::string sid = e.SessionsEnabled() ? m.session_id : std::string();
	Session(e, sid, true)->available.insert(m.seq);
	NotifyAvailable(e, sid);
}

void
Broker::ReleaseLock(Entity &e, StoredMessage &m, int64_t now, bool count_delivery) {
	Unlock(e, m);
	if (count_delivery)
		++m.delivery_count;
	auto it = e.msgs.find(m.seq);
	if (e.kind != Entity::Kind::DeadLetter && static_cast<int>(m.delivery_count) >= e.props.max_delivery_count) {
		MoveToDeadLetter(e, it, "MaxDeliveryCountExceeded",
		                 "Message could not be consumed after " + std::to_string(e.props.max_delivery_count) +
		                     " delivery attempts.",
		                 nullptr, now);
		return;
	}
	if (m.expires_ms <= now) {
		Expire(e, it, now);
		return;
	}
	MakeAvailable(e, m, now);
}

void
Broker::MoveToDeadLetter(Entity &e, std::map<uint64_t, StoredMessage>::iterator it, const std::string &reason,
                         const std::string &desc, const amqp::Value *props, int64_t now, int hops) {
	StoredMessage m = it->second; // copy: Remove invalidates the original
	Remove(e, it);
	++e.counters.dead_lettered;
	std::vector<std::pair<std::string, amqp::Value>> set;
	set.emplace_back("DeadLetterReason", amqp::Value::String(reason));
	set.emplace_back("DeadLetterErrorDescription", amqp::Value::String(desc));
	auto bare = RewriteAppProps(*m.bare, set, props);
	if (bare)
		m.bare = std::move(bare);
	m.size = m.bare->size();
	m.state = MsgState::Active;
	m.deferred = false;
	m.lock_owner = nullptr;
	m.scheduled_ms = 0;
	m.dead_letter_source = e.kind == Entity::Kind::DeadLetter ? m.dead_letter_source : e.name;
	LOG_DEBUG("dead-lettered seq %llu of %s: %s", (unsigned long long)m.seq, e.name.c_str(), reason.c_str());
	if (!e.props.forward_dead_lettered_to.empty()) {
		Entity *target = Find(e.props.forward_dead_lettered_to);
		// The hop count goes on from the forwarding that brought the message here, so that a
		// dead-letter forward back into the same topic cannot loop.
		if (target && target->CanSend() && hops < kMaxForwardHops) {
			Forward(*target, m, now, hops + 1);
			return;
		}
		if (!target || !target->CanSend())
			LOG_WARN("%s: ForwardDeadLetteredMessagesTo '%s' is not a queue or topic; using the entity's own DLQ",
			         e.name.c_str(), e.props.forward_dead_lettered_to.c_str());
		else
			LOG_WARN("%s: dead-lettered seq %llu has been forwarded %d times; kept in the entity's own DLQ",
			         e.name.c_str(), (unsigned long long)m.seq, hops);
	}
	if (e.dlq) {
		++e.dlq->counters.sent;
		Store(*e.dlq, std::move(m), now);
	}
}

void
Broker::Expire(Entity &e, std::map<uint64_t, StoredMessage>::iterator it, int64_t now) {
	++e.counters.expired;
	if (e.props.dead_letter_on_expiration) {
		MoveToDeadLetter(e, it, "TTLExpiredException", "The message expired and was dead lettered.", nullptr, now);
	} else {
		Remove(e, it);
	}
}

StoredMessage *
Broker::Locked(Entity &e, const LockToken &t, int64_t now) {
	auto it = e.locks.find(t);
	if (it == e.locks.end())
		return nullptr;
	auto mit = e.msgs.find(it->second);
	if (mit == e.msgs.end() || mit->second.state != MsgState::Locked)
		return nullptr;
	StoredMessage &m = mit->second;
	if (e.SessionsEnabled() && !m.deferred) {
		SessionGroup *g = Session(e, m.session_id, false);
		if (!g || !g->owner || g->owner != m.lock_owner || g->locked_until <= now)
			return nullptr;
		return &m;
	}
	if (m.locked_until <= now)
		return nullptr;
	return &m;
}

bool
Broker::LockValid(Entity &e, const LockToken &t, int64_t now) {
	return Locked(e, t, now) != nullptr;
}

SettleResult
Broker::Complete(Entity &e, const LockToken &t, int64_t now) {
	StoredMessage *m = Locked(e, t, now);
	if (!m) {
		++e.counters.lock_lost;
		return SettleResult::LockLost;
	}
	++e.counters.completed;
	Remove(e, e.msgs.find(m->seq));
	return SettleResult::Ok;
}

SettleResult
Broker::Abandon(Entity &e, const LockToken &t, const amqp::Value *props, int64_t now) {
	StoredMessage *m = Locked(e, t, now);
	if (!m) {
		++e.counters.lock_lost;
		return SettleResult::LockLost;
	}
	++e.counters.abandoned;
	if (props && props->kind == amqp::Value::Kind::Map && !props->items.empty()) {
		auto bare = RewriteAppProps(*m->bare, {}, props);
		if (bare) {
			m->bare = std::move(bare);
			m->size = m->bare->size();
		}
	}
	ReleaseLock(e, *m, now, true);
	return SettleResult::Ok;
}

SettleResult
Broker::Defer(Entity &e, const LockToken &t, const amqp::Value *props, int64_t now) {
	StoredMessage *m = Locked(e, t, now);
	if (!m) {
		++e.counters.lock_lost;
		return SettleResult::LockLost;
	}
	++e.counters.deferred;
	if (props && props->kind == amqp::Value::Kind::Map && !props->items.empty()) {
		auto bare = RewriteAppProps(*m->bare, {}, props);
		if (bare) {
			m->bare = std::move(bare);
			m->size = m->bare->size();
		}
	}
	Unlock(e, *m);
	m->deferred = true;
	SetState(e, *m, MsgState::Deferred);
	return SettleResult::Ok;
}

SettleResult
Broker::DeadLetter(Entity &e, const LockToken &t, const std::string &reason, const std::string &desc,
                   const amqp::Value *props, int64_t now) {
	StoredMessage *m = Locked(e, t, now);
	if (!m) {
		++e.counters.lock_lost;
		return SettleResult::LockLost;
	}
	if (e.kind == Entity::Kind::DeadLetter)
		return SettleResult::NotAllowed;
	MoveToDeadLetter(e, e.msgs.find(m->seq), reason, desc, props, now);
	return SettleResult::Ok;
}

int64_t
Broker::RenewLock(Entity &e, const LockToken &t, int64_t now) {
	StoredMessage *m = Locked(e, t, now);
	if (!m) {
		++e.counters.lock_lost;
		return 0;
	}
	++e.counters.lock_renewals;
	if (e.SessionsEnabled() && !m->deferred) {
		SessionGroup *g = Session(e, m->session_id, false);
		return g ? g->locked_until : 0;
	}
	m->locked_until = now + e.props.lock_duration_ms;
	lock_timers_.push({m->locked_until, &e, m->seq, m->lock_gen});
	return m->locked_until;
}

int64_t
Broker::RenewSessionLock(Entity &e, const std::string &sid, const void *holder, int64_t now) {
	(void)holder;
	SessionGroup *g = Session(e, sid, false);
	if (!g || !g->owner || g->locked_until <= now)
		return 0;
	g->locked_until = now + e.props.lock_duration_ms;
	session_timers_.push({g->locked_until, &e, sid});
	for (auto &kv : e.locks) {
		auto it = e.msgs.find(kv.second);
		if (it != e.msgs.end() && it->second.session_id == sid && !it->second.deferred)
			it->second.locked_until = g->locked_until;
	}
	++e.counters.lock_renewals;
	return g->locked_until;
}

bool
Broker::LockSession(Entity &e, Consumer *c, const std::string &sid, bool any, int64_t now, std::string *locked_id,
                    std::string *cond) {
	if (!e.SessionsEnabled()) {
		*cond = "amqp:not-allowed";
		return false;
	}
	// Session locks that have lapsed but that Tick has not yet ended are ended now, the same way
	// (the old receiver's locks released, the receiver told), before anyone takes them over.
	std::vector<std::string> lapsed;
	for (auto &kv : e.groups)
		if (kv.second.owner && kv.second.owner != c && kv.second.locked_until <= now && (any || kv.first == sid))
			lapsed.push_back(kv.first);
	for (auto &id : lapsed)
		ExpireSessionLock(e, id, now);
	SessionGroup *g = nullptr;
	std::string chosen;
	if (!any) {
		g = Session(e, sid, true);
		if (g->owner && g->owner != c) {
			*cond = "com.microsoft:session-cannot-be-locked";
			return false;
		}
		chosen = sid;
	} else {
		uint64_t best = UINT64_MAX;
		for (auto &kv : e.groups) {
			SessionGroup &cand = kv.second;
			if (cand.owner || cand.available.empty())
				continue;
			if (*cand.available.begin() < best) {
				best = *cand.available.begin();
				g = &cand;
				chosen = kv.first;
			}
		}
		if (!g) {
			cond->clear();
			return false;
		}
	}
	g->owner = c;
	g->locked_until = now + e.props.lock_duration_ms;
	e.counters.max_sessions_locked = std::max<uint64_t>(e.counters.max_sessions_locked, e.SessionsLocked());
	session_timers_.push({g->locked_until, &e, chosen});
	c->session_bound = true;
	c->session_id = chosen;
	*locked_id = chosen;
	return true;
}

void
Broker::RemoveConsumer(Entity &e, Consumer *c, int64_t now) {
	e.consumers.erase(std::remove(e.consumers.begin(), e.consumers.end(), c), e.consumers.end());
	ReleaseOwner(e, c, now);
	if (c->session_bound) {
		SessionGroup *g = Session(e, c->session_id, false);
		if (g && g->owner == c) {
			g->owner = nullptr;
			g->locked_until = 0;
			if (g->messages == 0 && !g->has_state)
				e.groups.erase(c->session_id);
			else if (!g->available.empty() && on_session_available)
				on_session_available(e);
		}
	}
}

void
Broker::ReleaseOwner(Entity &e, const void *owner, int64_t now) {
	std::vector<uint64_t> seqs;
	for (auto &kv : e.locks) {
		auto it = e.msgs.find(kv.second);
		if (it != e.msgs.end() && it->second.lock_owner == owner)
			seqs.push_back(kv.second);
	}
	std::sort(seqs.begin(), seqs.end());
	for (uint64_t seq : seqs) {
		auto it = e.msgs.find(seq);
		if (it == e.msgs.end() || it->second.state != MsgState::Locked)
			continue;
		++e.counters.released_by_detach;
		ReleaseLock(e, it->second, now, true);
	}
}

std::vector<const StoredMessage *>
Broker::Peek(Entity &e, uint64_t from_seq, int count, const std::string *sid) {
	std::vector<const StoredMessage *> out;
	for (auto it = e.msgs.lower_bound(from_seq); it != e.msgs.end() && static_cast<int>(out.size()) < count; ++it) {
		if (sid && it->second.session_id != *sid)
			continue;
		out.push_back(&it->second);
	}
	return out;
}

bool
Broker::ReceiveDeferred(Entity &e, const std::vector<int64_t> &requested, bool peek_lock, const void *owner,
                        int64_t now, std::vector<StoredMessage *> *out, int64_t *missing) {
	// A number asked for twice is received once.
	std::vector<int64_t> seqs;
	std::set<int64_t> seen;
	for (int64_t s : requested)
		if (seen.insert(s).second)
			seqs.push_back(s);
	for (int64_t s : seqs) {
		auto it = e.msgs.find(static_cast<uint64_t>(s));
		if (it == e.msgs.end() || it->second.state != MsgState::Deferred) {
			*missing = s;
			return false;
		}
	}
	for (int64_t s : seqs) {
		auto it = e.msgs.find(static_cast<uint64_t>(s));
		StoredMessage &m = it->second;
		++e.counters.delivered;
		SetState(e, m, MsgState::Locked);
		GrantLock(e, m, owner);
		m.locked_until = now + e.props.lock_duration_ms;
		lock_timers_.push({m.locked_until, &e, m.seq, m.lock_gen});
		e.locks[m.lock] = m.seq;
		out->push_back(&m);
	}
	(void)peek_lock; // receive-and-delete callers complete the messages after encoding them
	return true;
}

bool
Broker::CancelScheduled(Entity &e, const std::vector<int64_t> &seqs, int64_t *missing) {
	std::vector<Entity *> targets;
	if (e.kind == Entity::Kind::Topic)
		targets = e.subscriptions;
	else
		targets.push_back(&e);
	auto scheduled_in = [](Entity *t, int64_t s) {
		auto it = t->msgs.find(static_cast<uint64_t>(s));
		return it != t->msgs.end() && it->second.state == MsgState::Scheduled ? it : t->msgs.end();
	};
	// All or nothing: every number must name a scheduled message before any is cancelled.
	std::set<int64_t> unique(seqs.begin(), seqs.end());
	for (int64_t s : seqs) {
		bool found = false;
		for (Entity *t : targets)
			if (scheduled_in(t, s) != t->msgs.end())
				found = true;
		if (!found) {
			*missing = s;
			return false;
		}
	}
	for (int64_t s : unique) {
		for (Entity *t : targets) {
			auto it = scheduled_in(t, s);
			if (it != t->msgs.end()) {
				Remove(*t, it);
				++t->counters.cancelled;
			}
		}
		if (e.kind == Entity::Kind::Topic)
			++e.counters.cancelled;
	}
	return true;
}

void
Broker::EncodeDelivery(const Entity &e, const StoredMessage &m, bool locked, std::string *out,
                       bool with_sequence_number) const {
	amqp::Writer w(out);
	// header: durable, priority, ttl, first-acquirer, delivery-count
	w.Descriptor(amqp::kHeader);
	size_t mark = w.BeginCompound(0xd0);
	w.Bool(m.durable);
	w.UByte(m.priority);
	int64_t ttl = m.ttl_ms > 0 ? m.ttl_ms : e.props.default_ttl_ms;
	if (ttl > 0 && ttl < 0xffffffffLL)
		w.UInt(static_cast<uint32_t>(ttl));
	else
		w.Null();
	w.Bool(m.delivery_count == 0);
	w.UInt(m.delivery_count);
	w.EndCompound(mark, 5);
	// message-annotations
	w.Descriptor(amqp::kMessageAnnotations);
	mark = w.BeginCompound(0xd1);
	w.Raw(m.annotations);
	uint32_t n = m.annotation_count;
	if (with_sequence_number) {
		w.Symbol("x-opt-sequence-number");
		w.Long(static_cast<int64_t>(m.seq));
		n += 2;
	}
	w.Symbol("x-opt-enqueued-time");
	w.Timestamp(m.enqueued_ms);
	n += 2;
	if (locked) {
		w.Symbol("x-opt-locked-until");
		w.Timestamp(m.locked_until);
		n += 2;
	}
	if (m.state == MsgState::Deferred || m.deferred || m.state == MsgState::Scheduled) {
		w.Symbol("x-opt-message-state");
		w.Int(m.state == MsgState::Scheduled ? 2 : 1);
		n += 2;
	}
	if (m.scheduled_ms) {
		w.Symbol("x-opt-scheduled-enqueue-time");
		w.Timestamp(m.scheduled_ms);
		n += 2;
	}
	if (!m.dead_letter_source.empty()) {
		w.Symbol("x-opt-deadletter-source");
		w.String(m.dead_letter_source);
		n += 2;
	}
	w.EndCompound(mark, n);
	out->append(*m.bare);
}

void
Broker::Tick(int64_t now) {
	while (!lock_timers_.empty() && lock_timers_.top().at <= now) {
		Timer t = lock_timers_.top();
		lock_timers_.pop();
		auto it = t.e->msgs.find(t.seq);
		if (it == t.e->msgs.end())
			continue;
		StoredMessage &m = it->second;
		if (m.state != MsgState::Locked || m.lock_gen != t.gen || m.locked_until > now)
			continue;
		++t.e->counters.lock_expired;
		LOG_DEBUG("lock of seq %llu on %s expired", (unsigned long long)m.seq, t.e->name.c_str());
		ReleaseLock(*t.e, m, now, true);
	}
	while (!ttl_timers_.empty() && ttl_timers_.top().at <= now) {
		Timer t = ttl_timers_.top();
		ttl_timers_.pop();
		auto it = t.e->msgs.find(t.seq);
		if (it == t.e->msgs.end() || it->second.expires_ms > now)
			continue;
		if (it->second.state == MsgState::Active || it->second.state == MsgState::Deferred)
			Expire(*t.e, it, now);
	}
	while (!schedule_timers_.empty() && schedule_timers_.top().at <= now) {
		Timer t = schedule_timers_.top();
		schedule_timers_.pop();
		auto it = t.e->msgs.find(t.seq);
		if (it == t.e->msgs.end() || it->second.state != MsgState::Scheduled)
			continue;
		StoredMessage &m = it->second;
		m.enqueued_ms = now;
		MakeAvailable(*t.e, m, now);
	}
	while (!session_timers_.empty() && session_timers_.top().at <= now) {
		SessionTimer t = session_timers_.top();
		session_timers_.pop();
		SessionGroup *g = Session(*t.e, t.id, false);
		if (!g || !g->owner || g->locked_until > now)
			continue;
		ExpireSessionLock(*t.e, t.id, now);
	}
	for (auto &ep : entities_) {
		Entity &e = *ep;
		while (!e.dup_order.empty() && SatAdd(e.dup_order.front().first, e.props.duplicate_window_ms) <= now) {
			auto it = e.dup_ids.find(e.dup_order.front().second);
			if (it != e.dup_ids.end() && it->second == e.dup_order.front().first)
				e.dup_ids.erase(it);
			e.dup_order.pop_front();
		}
	}
}

// Ends a session lock: the owner loses the session first (so that releasing its messages does
// not hand them straight back to it), its message locks are released once (delivery count + 1),
// it is told (the server detaches the link), and a waiting receiver may take the session.
void
Broker::ExpireSessionLock(Entity &e, const std::string &sid, int64_t now) {
	SessionGroup *g = Session(e, sid, false);
	if (!g || !g->owner)
		return;
	Consumer *owner = g->owner;
	LOG_DEBUG("session lock of '%s' on %s expired", sid.c_str(), e.name.c_str());
	g->owner = nullptr;
	g->locked_until = 0;
	owner->session_bound = false;
	ReleaseOwner(e, owner, now); // may drop the group (its last message dead-lettered)
	owner->SessionLockLost();    // the server detaches the link; it stays a consumer until then
	g = Session(e, sid, false);
	if (!g || g->owner)
		return;
	if (g->messages == 0 && !g->has_state)
		e.groups.erase(sid);
	else if (!g->available.empty() && on_session_available)
		on_session_available(e);
}

void
Broker::ExpireAllLocks(int64_t now) {
	for (auto &ep : entities_) {
		Entity &e = *ep;
		// Session locks first, through the same path as their expiry, so that each message is
		// released once and not redelivered to the receiver that is losing the session.
		if (e.SessionsEnabled()) {
			std::vector<std::string> owned;
			for (auto &kv : e.groups)
				if (kv.second.owner)
					owned.push_back(kv.first);
			for (auto &id : owned) {
				for (auto &kv : e.locks) {
					auto it = e.msgs.find(kv.second);
					if (it != e.msgs.end() && it->second.session_id == id && !it->second.deferred)
						++e.counters.lock_expired;
				}
				ExpireSessionLock(e, id, now);
			}
		}
		// Then message locks (all of them on other entities; deferred messages received by
		// sequence number on session entities).
		std::vector<uint64_t> seqs;
		for (auto &kv : e.locks)
			seqs.push_back(kv.second);
		std::sort(seqs.begin(), seqs.end());
		for (uint64_t s : seqs) {
			auto it = e.msgs.find(s);
			if (it != e.msgs.end() && it->second.state == MsgState::Locked) {
				++e.counters.lock_expired;
				ReleaseLock(e, it->second, now, true);
			}
		}
	}
}

void
Broker::Purge(Entity &e) {
	std::vector<uint64_t> seqs;
	for (auto &kv : e.msgs)
		if (kv.second.state != MsgState::Locked)
			seqs.push_back(kv.first);
	for (uint64_t s : seqs)
		Remove(e, e.msgs.find(s));
}

void
Broker::ResetCounters() {
	for (auto &e : entities_)
		e->counters = Counters();
}

} // namespace sbemu
