{{/* Names, labels and the connection settings every template shares. */}}

{{- define "sep.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sep.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A component's resource name: <fullname>-<component>. Call with (list $ "billing"). */}}
{{- define "sep.component" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "sep.fullname" $root | trunc 50 | trimSuffix "-") (index . 1) -}}
{{- end -}}

{{- define "sep.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "sep.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: smart-energy-platform
{{- end -}}

{{/* Selector labels of one component. Call with (list $ "billing"). */}}
{{- define "sep.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "sep.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "sep.componentLabels" -}}
{{ include "sep.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "sep.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "sep.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sep.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* --- RabbitMQ: the operator's cluster or an existing broker ---------------------------- */}}

{{- define "sep.rabbitmq.clusterName" -}}
{{- include "sep.component" (list . "rabbitmq") -}}
{{- end -}}

{{/* The Secret holding RABBITMQ_URL (connection_string), username and password. */}}
{{- define "sep.rabbitmq.secret" -}}
{{- if .Values.rabbitmq.cluster.enabled -}}
{{- printf "%s-default-user" (include "sep.rabbitmq.clusterName" .) -}}
{{- else -}}
{{- required "rabbitmq.existingSecret: name the Secret with the broker's URL, or set rabbitmq.cluster.enabled" .Values.rabbitmq.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "sep.rabbitmq.urlKey" -}}
{{- if .Values.rabbitmq.cluster.enabled -}}connection_string{{- else -}}{{ .Values.rabbitmq.urlKey }}{{- end -}}
{{- end -}}
{{- define "sep.rabbitmq.usernameKey" -}}
{{- if .Values.rabbitmq.cluster.enabled -}}username{{- else -}}{{ .Values.rabbitmq.usernameKey }}{{- end -}}
{{- end -}}
{{- define "sep.rabbitmq.passwordKey" -}}
{{- if .Values.rabbitmq.cluster.enabled -}}password{{- else -}}{{ .Values.rabbitmq.passwordKey }}{{- end -}}
{{- end -}}

{{/* The management API KEDA polls, without credentials. */}}
{{- define "sep.rabbitmq.managementUrl" -}}
{{- if .Values.rabbitmq.cluster.enabled -}}
{{- printf "http://%s.%s.svc:15672/" (include "sep.rabbitmq.clusterName" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.rabbitmq.managementUrl -}}
{{- end -}}
{{- end -}}

{{/* --- MongoDB: the operator's replica set or an existing server ------------------------- */}}

{{- define "sep.mongodb.name" -}}
{{- include "sep.component" (list . "mongodb") -}}
{{- end -}}

{{/* The operator names the connection-string Secret <resource>-<user db>-<user>. */}}
{{- define "sep.mongodb.secret" -}}
{{- if .Values.mongodb.community.enabled -}}
{{- printf "%s-admin-%s" (include "sep.mongodb.name" .) .Values.mongodb.community.user -}}
{{- else -}}
{{- required "mongodb.existingSecret: name the Secret with MongoDB's URL, or set mongodb.community.enabled" .Values.mongodb.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "sep.mongodb.urlKey" -}}
{{- if .Values.mongodb.community.enabled -}}connectionString.standard{{- else -}}{{ .Values.mongodb.urlKey }}{{- end -}}
{{- end -}}

{{- define "sep.mongodb.passwordSecret" -}}
{{- default (printf "%s-password" (include "sep.mongodb.name" .)) .Values.mongodb.community.passwordSecret -}}
{{- end -}}

{{/* --- Redis ------------------------------------------------------------------------------ */}}

{{- define "sep.redis.name" -}}
{{- include "sep.component" (list . "redis") -}}
{{- end -}}

{{/* REDIS_URL as an env entry: from the chart's Redis, a plain URL, or a Secret. */}}
{{- define "sep.redis.env" -}}
{{- if .Values.redis.enabled }}
- name: REDIS_URL
  value: {{ printf "redis://%s:6379/0" (include "sep.redis.name" .) | quote }}
{{- else if .Values.redis.existingSecret }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.urlKey }}
{{- else }}
- name: REDIS_URL
  value: {{ required "redis.url or redis.existingSecret: where Redis is, or set redis.enabled" .Values.redis.url | quote }}
{{- end }}
{{- end -}}

{{- define "sep.rabbitmq.env" -}}
- name: RABBITMQ_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "sep.rabbitmq.secret" . }}
      key: {{ include "sep.rabbitmq.urlKey" . }}
{{- end -}}

{{- define "sep.mongodb.env" -}}
- name: MONGODB_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "sep.mongodb.secret" . }}
      key: {{ include "sep.mongodb.urlKey" . }}
{{- end -}}

{{/* The admin token's Secret: yours, or the one the chart generates. */}}
{{- define "sep.adminTokenSecret" -}}
{{- default (include "sep.component" (list . "admin-token")) .Values.gateway.adminToken.existingSecret -}}
{{- end -}}

{{/*
A random value for a generated Secret, or the one it already holds (lookup finds it on
upgrades; `helm template` has no cluster and always generates). Call with
(dict "root" $ "name" NAME "key" KEY).
*/}}
{{- define "sep.keptRandom" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .name -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum 48 -}}
{{- end -}}
{{- end -}}

{{/* Settings shared by every service's ConfigMap; with (list $ true), TOPOLOGY_PREFIX too
(the services that use the broker). */}}
{{- define "sep.sharedSettings" -}}
{{- $root := index . 0 -}}
LOG_LEVEL: {{ $root.Values.logLevel | quote }}
{{- with $root.Values.readings.maxUsageKwh }}
READING_MAX_USAGE_KWH: {{ . | toString | quote }}
{{- end }}
{{- with $root.Values.readings.maxFutureSkewS }}
READING_MAX_FUTURE_SKEW_S: {{ . | toString | quote }}
{{- end }}
{{- if and (index . 1) $root.Values.topologyPrefix }}
TOPOLOGY_PREFIX: {{ $root.Values.topologyPrefix | quote }}
{{- end }}
{{- end -}}

{{/* A service's extra settings from values (<service>.env), as ConfigMap data. */}}
{{- define "sep.extraSettings" -}}
{{- range $name, $value := . }}
{{ $name }}: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* Queue names as the services declare them (common/rabbit.py Topology). */}}
{{- define "sep.queue" -}}
{{- printf "%s%s.readings" (index . 0).Values.topologyPrefix (index . 1) -}}
{{- end -}}
