// src/schema/registry.cpp
//   Classifying a received message against the registered schemas, on the AMQP thread: which
//   message type and version it carries, and whether its JSON body is valid under that version's
//   schema. RapidJSON's draft-04 validator; documents are parsed iteratively.
#include "sbpg/schema/registry.hpp"

#include "sbpg/core/json.hpp"
#include "sbpg/core/text.hpp"
#include "sbpg/message/message.hpp"
#include "sbpg/schema/schema.hpp"

#include <rapidjson/document.h>
#include <rapidjson/schema.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <cctype>
#include <cstdlib>

namespace sbpg {
namespace schema {

struct Registry::Compiled {
	rapidjson::Document doc;
	std::unique_ptr<rapidjson::SchemaDocument> sd;
};

namespace {

// Not kParseFullPrecisionFlag: RapidJSON 1.1.0's full-precision path passes zero to clz for some
// numbers (undefined behaviour, found by test/fuzz/schema_fuzzer); normal precision validates the same.
constexpr unsigned kParse = rapidjson::kParseIterativeFlag;

std::string
Lower(std::string s) {
	for (auto &c : s)
		c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
	return s;
}

// A version from a string: "3", "v3", or the last segment of a URI such as
// https://schemas.contoso.com/orders/created/v3 or …?version=3. 0 when there is none.
int
VersionFrom(const std::string &text) {
	std::string s = text;
	size_t cut = s.find_last_of("/#=:");
	if (cut != std::string::npos)
		s = s.substr(cut + 1);
	while (!s.empty() && (s.back() == ' ' || s.back() == '/'))
		s.pop_back();
	if (!s.empty() && (s[0] == 'v' || s[0] == 'V'))
		s = s.substr(1);
	if (s.empty() || s.size() > 9 || s.find_first_not_of("0123456789") != std::string::npos)
		return 0;
	return std::atoi(s.c_str());
}

int
VersionValue(const rapidjson::Value &v) {
	if (v.IsInt() && v.GetInt() > 0)
		return v.GetInt();
	if (v.IsString())
		return VersionFrom(v.GetString());
	return 0;
}

// The v= parameter of a content type: application/json; v=2
int
ContentTypeVersion(const std::string &ct) {
	std::string l = Lower(ct);
	size_t p = 0;
	while ((p = l.find(';', p)) != std::string::npos) {
		++p;
		while (p < l.size() && l[p] == ' ')
			++p;
		if (l.compare(p, 2, "v=") == 0 || l.compare(p, 8, "version=") == 0) {
			size_t eq = l.find('=', p);
			size_t end = l.find(';', eq);
			std::string val = l.substr(eq + 1, end == std::string::npos ? std::string::npos : end - eq - 1);
			if (!val.empty() && val.front() == '"' && val.back() == '"' && val.size() >= 2)
				val = val.substr(1, val.size() - 2);
			return VersionFrom(val);
		}
	}
	return 0;
}

std::string
Stringify(const rapidjson::Value &v, size_t limit) {
	rapidjson::StringBuffer b;
	rapidjson::Writer<rapidjson::StringBuffer> w(b);
	v.Accept(w);
	std::string s(b.GetString(), b.GetSize());
	if (s.size() > limit)
		s = s.substr(0, Utf8Prefix(s, limit)) + "…"; // not inside a character
	return s;
}

// Makes schema_error valid UTF-8 when Classify returns, however it returns: the reason quotes the
// message's type and values, and goes into text columns and the DLQ description.
struct ValidSchemaError {
	ReceivedMessage *m;
	~ValidSchemaError() {
		try {
			m->schema_error = ToValidUtf8(m->schema_error);
		} catch (const std::exception &) {
			if (!m->schema_error.empty())
				m->schema_error = "unreadable"; // short enough not to allocate
		}
	}
};

// A structured-mode CloudEvent (application/cloudevents+json): the event is the body, and its
// `data` becomes the body that is validated and handed on. False when the event cannot be used
// (schema_reason and schema_error set).
bool
ReadStructuredEvent(ReceivedMessage *m, std::string *type, int *version) {
	rapidjson::Document ev;
	ev.Parse<kParse>(m->raw_body.c_str(), m->raw_body.size());
	if (ev.HasParseError() || !ev.IsObject() || !ev.HasMember("type") || !ev["type"].IsString()) {
		m->schema_reason = "SchemaViolation";
		m->schema_error = "a structured CloudEvent (application/cloudevents+json) needs an object body with a "
		                  "string \"type\"";
		return false;
	}
	*type = ev["type"].GetString();
	if (ev.HasMember("dataschema"))
		*version = VersionValue(ev["dataschema"]);
	if (ev.HasMember("data_base64")) {
		m->message_type = *type;
		m->schema_reason = "SchemaViolation";
		m->schema_error = "a structured CloudEvent with data_base64: only JSON data can be validated";
		return false;
	}
	if (ev.HasMember("data")) {
		m->raw_body = Stringify(ev["data"], std::string::npos);
		m->json = JsonVerdict::Json;
		m->body_kind = BodyKind::Data;
	} else {
		m->raw_body.clear();
		m->json = JsonVerdict::Empty;
		m->body_kind = BodyKind::None;
	}
	m->content_type = ev.HasMember("datacontenttype") && ev["datacontenttype"].IsString()
	                      ? ev["datacontenttype"].GetString()
	                      : "application/json";
	return true;
}

// The message's type and version: CloudEvents binary mode (application properties), structured
// mode (the body), or the subject; the version from the CloudEvent's dataschema, else the version
// property, else the content type's v= parameter (0 when none says). False when the message is
// refused already (schema_reason set).
bool
FindTypeAndVersion(ReceivedMessage *m, const ClassifyOptions &opt, std::string *type, int *version) {
	rapidjson::Document props;
	props.Parse<kParse>(m->properties_json.c_str(), m->properties_json.size());
	auto prop = [&](const char *name) -> const rapidjson::Value * {
		if (!props.IsObject())
			return nullptr;
		auto it = props.FindMember(name);
		return it == props.MemberEnd() ? nullptr : &it->value;
	};
	const rapidjson::Value *v;
	if ((v = prop("cloudEvents:type")) && v->IsString()) {
		// CloudEvents, binary mode: attributes are application properties.
		*type = v->GetString();
		if ((v = prop("cloudEvents:dataschema")))
			*version = VersionValue(*v);
	} else if (IStartsWith(m->content_type, "application/cloudevents+json")) {
		if (!ReadStructuredEvent(m, type, version))
			return false;
	} else if (!m->subject.empty()) {
		*type = m->subject;
	}
	if (!*version && (v = prop(opt.version_property.c_str())))
		*version = VersionValue(*v);
	if (!*version)
		*version = ContentTypeVersion(m->content_type);
	return true;
}

// Validates the JSON body against a compiled schema; when it fails, schema_error says which
// keyword failed where, and with what value (for "required", which names are missing).
void
Validate(ReceivedMessage *m, const rapidjson::Document &schema_doc, const rapidjson::SchemaDocument &sd) {
	rapidjson::Document body;
	body.Parse<kParse>(m->raw_body.c_str(), m->raw_body.size());
	if (body.HasParseError()) {
		m->schema_reason = "SchemaViolation";
		m->schema_error = "the body cannot be validated (a number beyond double precision, or nesting too deep)";
		return;
	}
	rapidjson::SchemaValidator validator(sd);
	if (body.Accept(validator))
		return;
	rapidjson::StringBuffer sp, dp;
	validator.GetInvalidSchemaPointer().Stringify(sp);
	validator.GetInvalidDocumentPointer().Stringify(dp);
	std::string doc_ptr(dp.GetString(), dp.GetSize());
	std::string schema_ptr(sp.GetString(), sp.GetSize());
	if (!doc_ptr.empty() && doc_ptr[0] == '#')
		doc_ptr = doc_ptr.substr(1);
	if (!schema_ptr.empty() && schema_ptr[0] == '#')
		schema_ptr = schema_ptr.substr(1);
	std::string keyword = validator.GetInvalidSchemaKeyword();
	// What failed, in words: the offending value, or for "required" the missing names.
	std::string what;
	const rapidjson::Value *here = validator.GetInvalidDocumentPointer().Get(body);
	if (keyword == "required") {
		const rapidjson::Value *sub = validator.GetInvalidSchemaPointer().Get(schema_doc);
		if (sub && sub->IsObject() && sub->HasMember("required") && (*sub)["required"].IsArray() && here &&
		    here->IsObject()) {
			for (auto &name : (*sub)["required"].GetArray())
				if (name.IsString() && !here->HasMember(name))
					what += (what.empty() ? "missing " : ", ") + Stringify(name, 100);
		}
	} else if (here) {
		what = "the value is " + Stringify(*here, 200);
	}
	m->schema_reason = "SchemaViolation";
	m->schema_error = "\"" + keyword + "\" failed at " + (doc_ptr.empty() ? std::string("/") : doc_ptr) +
	                  (what.empty() ? "" : ": " + what) + " (message type \"" + m->message_type + "\" version " +
	                  std::to_string(m->schema_version) + ", schema " + (schema_ptr.empty() ? "/" : schema_ptr) + ")";
}

} // namespace

Registry::~Registry() = default;

size_t
Registry::size() const {
	size_t n = 0;
	for (auto &t : types_)
		n += t.second.size();
	return n;
}

std::shared_ptr<const Registry>
Registry::Build(const std::vector<SchemaRow> &rows, std::vector<std::string> *errors) {
	std::shared_ptr<Registry> r(new Registry());
	for (auto &row : rows) {
		std::string why;
		try {
			if (!CheckSchemaSupported(row.schema_json, &why)) {
				errors->push_back(row.message_type + " version " + std::to_string(row.version) + ": " + why);
				continue;
			}
			auto c = std::make_unique<Compiled>();
			c->doc.Parse<kParse>(row.schema_json.c_str(), row.schema_json.size());
			if (c->doc.HasParseError() || !c->doc.IsObject()) {
				errors->push_back(row.message_type + " version " + std::to_string(row.version) + ": not a JSON object");
				continue;
			}
			c->sd = std::make_unique<rapidjson::SchemaDocument>(c->doc);
			r->types_[row.message_type][row.version] = std::move(c);
		} catch (const std::exception &e) {
			errors->push_back(row.message_type + " version " + std::to_string(row.version) + ": " + e.what());
		}
	}
	return r;
}

void
Registry::Classify(ReceivedMessage *m, const ClassifyOptions &opt) const {
	ValidSchemaError valid_error{m};
	try {
		if (!m->decode_error.empty() || m->json == JsonVerdict::Invalid)
			return; // dead-lettered for that already
		std::string type;
		int version = 0;
		if (!FindTypeAndVersion(m, opt, &type, &version))
			return;
		m->message_type = type;
		m->schema_version = version;
		auto unknown = [&](const std::string &why) {
			if (opt.unknown == UnknownPolicy::DeadLetter) {
				m->schema_reason = "UnknownMessageType";
				m->schema_error = why;
			}
		};
		if (type.empty())
			return unknown("the message names no type (no CloudEvents type, no subject)");
		auto t = types_.find(type);
		if (t == types_.end() || t->second.empty())
			return unknown("no schema is registered for message type \"" + type + "\"");
		auto s = version ? t->second.find(version) : std::prev(t->second.end());
		if (s == t->second.end())
			return unknown("version " + std::to_string(version) + " of message type \"" + type +
			               "\" is not registered (the latest is " + std::to_string(t->second.rbegin()->first) + ")");
		m->schema_version = s->first;
		m->latest_version = t->second.rbegin()->first;
		if (m->json != JsonVerdict::Json) {
			m->schema_reason = "SchemaViolation";
			m->schema_error = "message type \"" + type + "\" version " + std::to_string(s->first) +
			                  " has a JSON Schema, and the body is not JSON";
			return;
		}
		Validate(m, s->second->doc, *s->second->sd);
	} catch (const std::exception &e) {
		m->schema_reason = "SchemaViolation";
		m->schema_error = std::string("the message could not be validated: ") + e.what();
	}
}

} // namespace schema
} // namespace sbpg
